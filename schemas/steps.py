"""Records read back from Postgres, and the handoff an agent asks for."""

from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import Field

from orchestrator.schemas.base import Wire
from orchestrator.schemas.status import StepStatus, WorkflowStatus


class Handoff(Wire):
    """Route the workflow to ``agent`` next (routing is data, not code paths)."""

    agent: str = Field(min_length=1)


class StepRecord(Wire):
    """A step as Postgres has it: agent, status, fence (attempt), output or error."""

    id: UUID
    workflow_id: UUID
    seq: int
    agent: str
    status: StepStatus
    attempt: int
    output: dict[str, Any] | None
    error: str | None
    created_at: datetime
    completed_at: datetime | None
    # Set while the step waits: the question put to a person (``ctx.ask``), the signal
    # it waits for, and when its timer (a sleep, a wait's timeout, a retry) is due.
    question: str | None = None
    waiting_for: str | None = None
    not_before: datetime | None = None
    updated_at: datetime | None = None


class ToolRunRecord(Wire):
    """A tool call in the ledger, under its idempotency key."""

    idempotency_key: str
    ordinal: int
    tool: str
    status: str
    result: Any = None
    error: str | None = None


class WorkflowRecord(Wire):
    """A workflow as Postgres has it, with its steps."""

    id: UUID
    tenant_id: str
    session_id: str
    pipeline: str
    status: WorkflowStatus
    input: dict[str, Any]
    state: dict[str, Any]
    error: str | None
    app_version: str
    created_at: datetime
    completed_at: datetime | None
    steps: tuple[StepRecord, ...] = ()
