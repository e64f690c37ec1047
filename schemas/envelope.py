"""The task envelope carried on an agent's Redis stream."""

from typing import Any, Literal
from uuid import UUID

from pydantic import Field

from orchestrator.schemas.base import Wire

ENVELOPE_SCHEMA_VERSION = 1


class TaskEnvelope(Wire):
    """One unit of work for one agent.

    ``attempt`` is the fence: the worker's completion only lands while the
    step row still carries this attempt, so a stale envelope (the step was
    re-enqueued with a higher attempt since) can never overwrite newer work.
    """

    schema_version: Literal[1] = 1  # ENVELOPE_SCHEMA_VERSION
    workflow_id: UUID
    step_id: UUID
    seq: int = Field(ge=0)
    pipeline: str
    agent: str
    attempt: int = Field(ge=1)
    tenant_id: str
    assigned_by: str
    payload: dict[str, Any]
    # W3C trace context, so a trace can follow a ticket across processes.
    traceparent: str | None = None
