"""``ctx.info``: which step execution is running (a frozen value, as Temporal's ``Info``)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True, slots=True)
class StepInfo:
    """The running execution: its workflow, step, agent, fence (attempt), and whose it is
    (tenant, session, customer: read from the workflow row in Postgres, never taken from
    the task envelope)."""

    workflow_id: UUID
    step_id: UUID
    seq: int
    agent: str
    attempt: int
    tenant_id: str
    assigned_by: str
    pipeline: str
    session_id: str = ""
    customer_id: str = ""
