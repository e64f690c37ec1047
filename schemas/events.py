"""Audit events (Postgres) and live signals (Redis Pub/Sub)."""

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from orchestrator.schemas.base import Wire
from orchestrator.schemas.status import WorkflowStatus


class EventType(StrEnum):
    """The kinds of audit events recorded in Postgres (``events.type``)."""

    WORKFLOW_SUBMITTED = "workflow.submitted"
    WORKFLOW_COMPLETED = "workflow.completed"
    WORKFLOW_FAILED = "workflow.failed"
    STEP_COMPLETED = "step.completed"
    STEP_FAILED = "step.failed"
    STEP_RETRIED = "step.retried"
    STEP_REQUEUED = "step.requeued"
    STEP_TAKEN_OVER = "step.taken_over"
    STEP_DEAD_LETTERED = "step.dead_lettered"
    WORKFLOW_CANCELLED = "workflow.cancelled"
    WORKFLOW_RESUMED = "workflow.resumed"
    WORKFLOW_WAITING = "workflow.waiting"
    INPUT_RECEIVED = "workflow.input_received"
    WORKFLOW_FORKED = "workflow.forked"
    JOIN_STARTED = "workflow.join_started"
    BRANCH_FAILED = "step.branch_failed"
    STEP_WAITING = "step.waiting"
    STEP_WOKEN = "step.woken"
    SIGNAL_RECEIVED = "workflow.signal_received"
    MEMORY_HYDRATED = "memory.hydrated"  # working memory rebuilt from Postgres
    MEMORY_RECALLED = "memory.recalled"  # what a recall returned, with scores
    MEMORY_GOAL = "memory.goal"  # the session's goal, as the step set it
    TOOL_REPLAYED = "tool.replayed"  # a recorded tool result returned, the tool not called


class Event(Wire):
    """One audit event of a workflow (or of one of its steps)."""

    id: int
    workflow_id: UUID
    step_id: UUID | None
    type: EventType
    data: dict[str, Any]
    created_at: datetime


class Signal(Wire):
    """A nudge published after a durable change; the fact itself is in Postgres."""

    workflow_id: UUID
    status: WorkflowStatus
    seq: int
