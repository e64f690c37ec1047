"""Lifecycle states of workflows and steps, as stored in Postgres."""

from enum import StrEnum


class WorkflowStatus(StrEnum):
    """Where a workflow is in its life; the last three are terminal."""

    QUEUED = "queued"  # behind an earlier workflow of the same session
    RUNNING = "running"
    WAITING = "waiting"  # its only open step waits for a signal (a reply) or a timer
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Finished for good: completed, failed or cancelled."""
        return self in (WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED)


class StepStatus(StrEnum):
    """Where a step is in its life."""

    PENDING = "pending"  # a join, until every open branch of its workflow has ended
    # A queued step is open: a worker may be running it (its lease lives in a
    # Redis lock), and the first fenced completion closes it.
    QUEUED = "queued"
    WAITING = "waiting"  # parked on a signal or a timer; no worker holds it
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
