"""The whole story of one workflow, as ``orchestrator show`` prints it (``--json``: this).

The JSON shape (``schema_version`` 1; fields are only ever added):

- ``workflow``: id, tenant, session, pipeline, status, error, created/completed times,
  ``duration_seconds``, and the model use of every attempt summed (``model``);
- ``steps``, in order: seq, agent, who handed it on (``assigned_by``), status, the
  current fence (``attempt``), times, ``duration_seconds`` (created to completed, queue
  time included), ``cost_usd``, the question or signal it waits for, its memory
  ``recalls`` and ``waits``, and its ``attempts``: each with the worker, outcome
  (``completed``, ``failed``, ``waiting``; ``running`` for the execution under way, ``lost``
  for one that recorded tool calls but no outcome: its worker died or was superseded),
  times, model use (model, calls, tokens, ``cost_usd``), tool calls (``executed`` by it, or
  ``replayed``: the recorded result returned, the tool not called again; each with its
  idempotency key), and for a failure the error and the decision taken
  (``retried``, with ``retry_after_seconds``; ``dead-lettered``; ``branch failed``; ``failed``);
- ``signals`` sent to the workflow, with the step that took each;
- ``output``: the output of the last step that completed; ``state``: the workflow state;
- ``events``: the audit trail, oldest first.

Amounts are USD as JSON numbers; times are ISO 8601. A pruned workflow
(``orchestrator prune``) has lost its attempts, tool runs and events: its steps remain.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from orchestrator.schemas.base import Wire

STORY_SCHEMA_VERSION = 1
# What the failure path decided for a failed attempt.
Decision = Literal["retried", "dead-lettered", "branch failed", "failed"]


class ModelSpend(Wire):
    """Model calls and what they cost (one attempt's, or summed)."""

    model: str | None = None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class StoryToolCall(Wire):
    """A tool call of an attempt, by idempotency key: ``executed`` (its ledger status and
    error) or ``replayed`` (the recorded result returned; ``recorded_attempt`` made it)."""

    key: str
    tool: str
    ordinal: int
    how: Literal["executed", "replayed"]
    status: str
    error: str | None = None
    recorded_attempt: int | None = None


class StoryAttempt(Wire):
    """One execution of a step (its fence number ``attempt``)."""

    attempt: int
    worker: str | None
    outcome: Literal["completed", "failed", "waiting", "running", "lost"]
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    model: ModelSpend
    tool_calls: tuple[StoryToolCall, ...] = ()
    error: str | None = None
    decision: Decision | None = None
    retry_after_seconds: float | None = None


class StoryRecall(Wire):
    """A memory recall of the step (a ``memory.recalled`` event): the query, how it was
    answered, and the memories found (id, kind, key, score)."""

    query: str
    mode: str
    cached: bool
    memories: tuple[dict[str, Any], ...] = ()


class StoryWait(Wire):
    """The step parked (``parked``: on a signal, a timer, or a question) or woke (``woken``,
    ``by`` a timer or a signal)."""

    at: datetime
    kind: Literal["parked", "woken"]
    signal: str | None = None
    seconds: float | None = None
    question: str | None = None
    by: str | None = None


class StoryStep(Wire):
    """A step, its attempts, recalls and waits."""

    seq: int
    agent: str
    assigned_by: str
    status: str
    attempt: int
    created_at: datetime
    completed_at: datetime | None
    duration_seconds: float | None
    cost_usd: float
    error: str | None = None
    waiting_for: str | None = None
    question: str | None = None
    attempts: tuple[StoryAttempt, ...] = ()
    recalls: tuple[StoryRecall, ...] = ()
    waits: tuple[StoryWait, ...] = ()


class StorySignal(Wire):
    """A signal sent to the workflow; ``taken_by_seq`` is the step whose wait took it."""

    name: str
    payload: Any = None
    sent_at: datetime
    taken_at: datetime | None = None
    taken_by_seq: int | None = None


class StoryEvent(Wire):
    """One audit event (``seq``: its step's, if any)."""

    at: datetime
    type: str
    seq: int | None = None
    data: dict[str, Any]


class StoryWorkflow(Wire):
    """The workflow's row, with its whole model use."""

    id: UUID
    tenant_id: str
    session_id: str
    pipeline: str
    status: str
    error: str | None
    created_at: datetime
    completed_at: datetime | None
    duration_seconds: float | None
    model: ModelSpend
    pruned: bool = False


class Story(Wire):
    """The whole story of one workflow (see the module docstring for the shape)."""

    schema_version: int = STORY_SCHEMA_VERSION
    workflow: StoryWorkflow
    steps: tuple[StoryStep, ...]
    signals: tuple[StorySignal, ...] = ()
    output: dict[str, Any] | None = None
    state: dict[str, Any]
    events: tuple[StoryEvent, ...] = ()
