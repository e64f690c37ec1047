"""Pydantic models shared by the runtime, the agents and the CLI."""

from schemas.envelope import ENVELOPE_SCHEMA_VERSION, TaskEnvelope
from schemas.events import Event, EventType, Signal
from schemas.status import StepStatus, WorkflowStatus
from schemas.steps import Handoff, StepRecord, ToolRunRecord, WorkflowRecord
from schemas.ticket import Ticket

__all__ = [
    "ENVELOPE_SCHEMA_VERSION",
    "Event",
    "EventType",
    "Handoff",
    "Signal",
    "StepRecord",
    "StepStatus",
    "TaskEnvelope",
    "Ticket",
    "ToolRunRecord",
    "WorkflowRecord",
    "WorkflowStatus",
]
