"""Lifecycle states of workflows and steps, as stored in Postgres."""

from enum import StrEnum


class WorkflowStatus(StrEnum):
    QUEUED = "queued"  # behind an earlier workflow of the same session
    RUNNING = "running"
    WAITING = "waiting"  # parked until a person answers a step's question
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)


class StepStatus(StrEnum):
    # A queued step is open: a worker may be running it (its lease lives in a
    # Redis lock), and the first fenced completion closes it.
    QUEUED = "queued"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
