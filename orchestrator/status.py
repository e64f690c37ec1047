"""Live agent status (Redis hashes with a TTL): a view for humans, never a source of truth."""

from __future__ import annotations

import time

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from orchestrator.keys import Keys
from schemas import TaskEnvelope


def running(envelope: TaskEnvelope) -> dict[FieldT, EncodableT]:
    return {
        "status": "running",
        "current_task": f"{envelope.workflow_id}:{envelope.seq}",
        "assigned_by": envelope.assigned_by,
        "checkpoint": envelope.seq - 1,
    }


def idle(envelope: TaskEnvelope) -> dict[FieldT, EncodableT]:
    return {
        "status": "idle",
        "current_task": "",
        "assigned_by": envelope.assigned_by,
        "checkpoint": envelope.seq,
    }


async def mark(
    client: aioredis.Redis,
    keys: Keys,
    agent: str,
    consumer: str,
    fields: dict[FieldT, EncodableT],
    ttl: int,
) -> None:
    key = keys.agent_status(agent, consumer)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping={**fields, "last_updated": f"{time.time():.3f}"})
    pipe.expire(key, ttl)
    await pipe.execute()
