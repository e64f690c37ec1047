"""``ctx.info``: which step execution is running (a frozen value, as Temporal's ``Info``)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True, slots=True)
class StepInfo:
    """The running execution: its workflow, step, agent, fence (attempt) and tenant."""

    workflow_id: UUID
    step_id: UUID
    seq: int
    agent: str
    attempt: int
    tenant_id: str
    assigned_by: str
    pipeline: str
