"""Delayed retries in a Redis sorted set: a speed-up only.

The durable schedule is ``steps.not_before`` in Postgres; if this set is lost,
the reconciler re-enqueues the step once its time has come. Retries are added
to the set in the failed step's handoff round trip (``streams.hand_off_in``).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis
from pydantic import ValidationError

from orchestrator.coordination import streams
from orchestrator.coordination.keys import Keys
from orchestrator.schemas import TaskEnvelope


async def move_due(client: aioredis.Redis, keys: Keys, *, limit: int = 100) -> int:
    """Move due envelopes to their agent streams; ZREM first, so one mover wins each."""
    due: Any = await client.zrangebyscore(keys.delayed(), "-inf", time.time(), start=0, num=limit)
    moved = 0
    for raw in due:
        if not await client.zrem(keys.delayed(), raw):
            continue  # another worker took it
        try:
            envelope = TaskEnvelope.model_validate_json(raw)
        except ValidationError:
            continue  # unreadable: the reconciler re-derives the step from Postgres
        await streams.enqueue(client, keys, envelope)
        moved += 1
    return moved
