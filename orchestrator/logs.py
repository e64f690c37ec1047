"""Logging: one line per event, as text or JSON, each naming the step it is about.

The engine binds the step an execution works on (``bind_step``, a ContextVar, so
each task sees its own); the handler's filter (``StepFields``) adds its
``workflow_id``, ``step_id``, ``seq``, ``agent`` and ``attempt`` to every record
logged meanwhile, by the runtime, an agent or a library, with the ``trace_id`` and
``span_id`` of the current span (before the step's span starts: the trace its
envelope carries). A record that names them itself (``extra=``) keeps its own.

``ORCHESTRATOR_LOG_FORMAT=json`` writes one JSON object per line::

    {"time": "2025-01-01T12:00:00.123Z", "level": "INFO", "logger": "orchestrator.worker",
     "message": "workflow 5d6… step 1 (research): taking over as attempt 2 …",
     "workflow_id": "5d6…", "step_id": "0b1…", "seq": 1, "agent": "research", "attempt": 2,
     "trace_id": "4bf9…", "span_id": "00f0…"}

``text`` (the default) appends the known ones to the usual line:
``… INFO orchestrator.worker: … [workflow=5d6… step=1 agent=research attempt=2 trace=4bf9…]``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from opentelemetry import trace

from orchestrator.schemas import TaskEnvelope

LogFormat = Literal["text", "json"]
# What a record may carry about its step, in the order lines show them.
FIELDS = ("workflow_id", "step_id", "seq", "agent", "attempt", "trace_id", "span_id")
# The fields a text line shows, by the name it gives them.
_TEXT_NAMES = {
    "workflow_id": "workflow",
    "seq": "step",
    "agent": "agent",
    "attempt": "attempt",
    "trace_id": "trace",
}


@dataclass(frozen=True, slots=True)
class BoundStep:
    """The step an execution works on, as its log lines name it."""

    workflow_id: str
    step_id: str
    seq: int
    agent: str
    attempt: int
    trace_id: str | None  # from the envelope's traceparent, when it has one


_bound: contextvars.ContextVar[BoundStep | None] = contextvars.ContextVar(
    "orchestrator_log_step", default=None
)


def bind_step(envelope: TaskEnvelope) -> contextvars.Token[BoundStep | None]:
    """Name ``envelope``'s step (and attempt) on every line this task logs from now on;
    pass the token to ``unbind`` when done. Bind again after the attempt changes."""
    return _bound.set(
        BoundStep(
            str(envelope.workflow_id),
            str(envelope.step_id),
            envelope.seq,
            envelope.agent,
            envelope.attempt,
            _trace_id(envelope.traceparent),
        )
    )


def unbind(token: contextvars.Token[BoundStep | None]) -> None:
    """Forget the step bound by ``bind_step`` (and any bound after it in this task)."""
    _bound.reset(token)


def _trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (``00-<trace id>-<span id>-<flags>``)."""
    parts = (traceparent or "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


class StepFields(logging.Filter):
    """Adds the bound step's ids and the current trace to each record (see the module
    docstring); never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Set the step's fields the record does not carry already."""
        found: dict[str, Any] = {}
        bound = _bound.get()
        if bound is not None:
            found.update(asdict(bound))
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            found["trace_id"] = format(context.trace_id, "032x")
            found["span_id"] = format(context.span_id, "016x")
        for name, value in found.items():
            if value is not None and getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {n: v for n in FIELDS if (v := getattr(record, n, None)) is not None}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC), level, logger, message, the step's fields,
    and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **{k: str(v) if k.endswith("_id") else v for k, v in _fields(record).items()},
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The usual line, then ``[workflow=… step=… agent=… attempt=… trace=…]`` for what is
    known of the record's step."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as text, the step's fields appended."""
        text = super().format(record)
        known = _fields(record)
        tags = " ".join(f"{_TEXT_NAMES[k]}={known[k]}" for k in _TEXT_NAMES if k in known)
        if not tags:
            return text
        head, newline, rest = text.partition("\n")  # a traceback stays below the line
        return f"{head} [{tags}]{newline}{rest}"


_INSTALLED = "_orchestrator_handler"


def configure(
    level: int, fmt: LogFormat = "text", *, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record at ``level`` and above to ``stream`` (stderr), one line per
    event as ``fmt`` says, with the step's fields. Replaces the handler an earlier call
    installed; returns the new one (remove it with ``logging.getLogger().removeHandler``)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _INSTALLED, False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(StepFields())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    setattr(handler, _INSTALLED, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
