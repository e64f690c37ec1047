"""Pydantic models shared by the runtime, the agents and the CLI."""

from orchestrator.schemas.envelope import ENVELOPE_SCHEMA_VERSION, TaskEnvelope
from orchestrator.schemas.events import Event, EventType, Signal
from orchestrator.schemas.status import StepStatus, WorkflowStatus
from orchestrator.schemas.steps import Handoff, StepRecord, ToolRunRecord, WorkflowRecord

__all__ = [
    "ENVELOPE_SCHEMA_VERSION",
    "Event",
    "EventType",
    "Handoff",
    "Signal",
    "StepRecord",
    "StepStatus",
    "TaskEnvelope",
    "ToolRunRecord",
    "WorkflowRecord",
    "WorkflowStatus",
]
