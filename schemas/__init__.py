"""Pydantic models shared by the runtime, the agents and the CLI; ``memory``: working
memory's plain values (no Redis), shared by the step API and the Redis side; ``story``:
a workflow's whole history as ``orchestrator show`` prints it."""

from orchestrator.schemas.envelope import ENVELOPE_SCHEMA_VERSION, TaskEnvelope
from orchestrator.schemas.events import Event, EventType, Signal
from orchestrator.schemas.status import StepStatus, WorkflowStatus
from orchestrator.schemas.steps import Handoff, StepRecord, ToolRunRecord, WorkflowRecord
from orchestrator.schemas.story import Story

__all__ = [
    "ENVELOPE_SCHEMA_VERSION",
    "Event",
    "EventType",
    "Handoff",
    "Signal",
    "StepRecord",
    "StepStatus",
    "Story",
    "TaskEnvelope",
    "ToolRunRecord",
    "WorkflowRecord",
    "WorkflowStatus",
]
