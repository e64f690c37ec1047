"""Live agent status (Redis hashes with a TTL): a view for humans, never a source of truth.

Each worker refreshes one hash per agent it serves about once a second, from
the steps it is running, instead of writing it on every step: the view stays
live and the hot path stays two Redis round trips per step. The same refresh
carries the worker's liveness key, which says whether its steps may be taken over.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from orchestrator.coordination.keys import Keys
from orchestrator.schemas import TaskEnvelope


def fields(running: Sequence[TaskEnvelope], last: TaskEnvelope | None) -> dict[FieldT, EncodableT]:
    """``running`` oldest first; ``last`` the most recent step this consumer took."""
    if running:
        newest = running[-1]
        return {
            "status": "running",
            "current_task": f"{newest.workflow_id}:{newest.seq}",
            "assigned_by": newest.assigned_by,
            "checkpoint": newest.seq - 1,
            "in_flight": len(running),
        }
    return {
        "status": "idle",
        "current_task": "",
        "assigned_by": last.assigned_by if last else "",
        "checkpoint": last.seq if last else -1,
        "in_flight": 0,
    }


async def alive(client: aioredis.Redis, keys: Keys, consumers: Sequence[str]) -> list[bool]:
    """Whether each worker (stream consumer) still refreshes its liveness key: one round trip."""
    pipe = client.pipeline(transaction=False)
    for consumer in consumers:
        pipe.exists(keys.worker_alive(consumer))
    return [bool(n) for n in await pipe.execute()]


def mark_alive_in(pipe: Any, keys: Keys, consumer: str, ttl_seconds: float) -> None:
    """Queue the refresh of a worker's liveness key on a pipeline."""
    pipe.set(keys.worker_alive(consumer), "1", px=int(ttl_seconds * 1000))


def mark_in(pipe: Any, key: str, values: dict[FieldT, EncodableT], ttl: int) -> None:
    """Queue a status update on a pipeline."""
    pipe.hset(key, mapping={**values, "last_updated": f"{time.time():.3f}"})
    pipe.expire(key, ttl)
