"""Live agent status (Redis hashes with a TTL): a view for humans, never a source of truth."""

from __future__ import annotations

import time
from typing import Any

from redis.typing import EncodableT, FieldT

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


def mark_in(pipe: Any, key: str, fields: dict[FieldT, EncodableT], ttl: int) -> None:
    """Queue a status update on a pipeline (it rides another round trip)."""
    pipe.hset(key, mapping={**fields, "last_updated": f"{time.time():.3f}"})
    pipe.expire(key, ttl)
