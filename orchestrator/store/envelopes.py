"""The one place task envelopes are built: from a parent step, or from a step row."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from orchestrator.schemas import TaskEnvelope


def next_step(
    parent: TaskEnvelope,
    *,
    step_id: UUID,
    seq: int,
    agent: str,
    state: dict[str, Any],
    traceparent: str | None,
    attempt: int = 1,
    assigned_by: str | None = None,
) -> TaskEnvelope:
    """The envelope of a step that ``parent``'s completion hands on to (same workflow,
    pipeline and tenant; assigned by the parent's agent unless said otherwise)."""
    return TaskEnvelope(
        workflow_id=parent.workflow_id,
        step_id=step_id,
        seq=seq,
        pipeline=parent.pipeline,
        agent=agent,
        attempt=attempt,
        tenant_id=parent.tenant_id,
        assigned_by=assigned_by or parent.agent,
        payload=state,
        traceparent=traceparent or parent.traceparent,
    )


def of_row(row: Any) -> TaskEnvelope:
    """The envelope of a step row joined with its workflow's tenant and pipeline; its
    stored ``traceparent`` keeps it in the workflow's trace."""
    return TaskEnvelope(
        workflow_id=row["workflow_id"],
        step_id=row["id"],
        seq=row["seq"],
        agent=row["agent"],
        attempt=row["attempt"],
        tenant_id=row["tenant_id"],
        pipeline=row["pipeline"],
        assigned_by=row["assigned_by"],
        payload=row["input"],
        traceparent=row["traceparent"],
    )
