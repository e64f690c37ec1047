"""Unit-test agents and pipelines in-process: a scripted model, fake tools, no servers.

``AgentHarness`` runs one agent, or a whole pipeline, the way a worker would (input
validation, the step context, the tool ledger, ``route()``, forks and joins, the step
limit, retries) but in this process, on no Redis and no Postgres, in milliseconds::

    from orchestrator.testing import AgentHarness, ScriptedModel

    model = ScriptedModel({"triage": {"category": "billing", ...}})
    harness = AgentHarness(app, model=model, tools={"lookup_order": fake_lookup})
    result = await harness.run(TriageAgent, {"ticket": ticket})
    assert result.output.category == "billing" and result.next == ("research",)
    assert "charged twice" in model.requests[0].content

    flow = await harness.run_pipeline("support", ticket)
    assert flow.status is WorkflowStatus.COMPLETED and flow.agents == ["triage", ...]

What differs from a worker, on purpose:

* ``ctx.ask`` and ``ctx.wait_for`` take the harness's scripted replies and signals
  (each taken once, in order, per run); with none left they raise ``WaitTimedOut``
  when given a timeout, and otherwise the run stops there, parked, and reports the wait.
  ``ctx.sleep`` returns at once (recorded). ``ctx.cancelled()`` is always False.
* Fake tools replace registered ones by name; every call (fake or real) is recorded
  with its arguments and idempotency key. Registered idempotent tools without a fake
  run for real. A non-idempotent tool without a fake needs Postgres: it raises
  ``NeedsServers`` (fake the tool, or use a ``Worker`` on servers).
* ``ctx.memory`` works on the test's data: ``transcript`` (the customer's earlier
  lines) plus the lines of the steps run so far in this pipeline run is its working
  memory; ``recall`` ranks the given ``memory`` items by the embedder's cosine
  similarity. What a step did with memory is in ``AgentResult.memory_events``.
* No durability: nothing is committed, and a parked step is not resumed.
* ``run`` raises what the agent raised; ``run_pipeline`` retries a failed step at once
  (no backoff) up to its ``max_attempts``, reusing recorded tool results as a worker
  would, then fails the workflow (or only the branch, under a join with
  ``optional_branches``). Mistakes of the test itself (``HarnessError``: an exhausted
  script, a step that needs servers) are raised, never taken for a step failure.
* Parallel branches run breadth first, in step order, one by one or (``concurrent=True``)
  each wave of ready steps at once; their results are merged in step order either way,
  so a run is deterministic.

For integration tests on real servers, ``Worker.run_until_idle()`` drains the queues.
"""

from __future__ import annotations

import inspect
import json
import math
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Generic, Literal, TypeAlias, TypeVar, overload
from uuid import UUID, uuid4

import anyio
from opentelemetry.trace import NoOpTracer, Tracer
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from orchestrator.app import App, Pipeline
from orchestrator.errors import (
    AgentError,
    ConfigurationError,
    NonDeterminismError,
    OrchestratorError,
    Parked,
    StepError,
    StepLimitReached,
    WaitTimedOut,
)
from orchestrator.faults import CrashPoints
from orchestrator.metrics import Metrics
from orchestrator.models.embeddings import Embedder, LexicalEmbedder
from orchestrator.models.llm import (
    Completion,
    LanguageModel,
    ModelRequest,
    OfflineModel,
    T,
    ToolDef,
    ToolRunner,
    Usage,
)
from orchestrator.models.pricing import Pricing
from orchestrator.schemas import WorkflowStatus
from orchestrator.schemas import memory as wm
from orchestrator.schemas.memory import Line, Recalled, WorkingMemory
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent
from orchestrator.step.context import INPUT_SIGNAL, StepContext
from orchestrator.step.info import StepInfo
from orchestrator.step.memory import (
    HYDRATED,
    MESSAGE_CHARS,
    RECALLED,
    RECALLED_CHARS,
    SessionMemory,
)
from orchestrator.step.run import run_agent
from orchestrator.step.services import Limiter, RecallCache, WorkingMemoryCache
from orchestrator.step.tools import RUNTIME_PARAMS, ToolSpec
from orchestrator.store.memory import Memory
from orchestrator.store.operations import Store
from orchestrator.store.tool_runs import ToolRun

__all__ = [
    "AgentHarness",
    "AgentResult",
    "HarnessError",
    "ModelCall",
    "NeedsServers",
    "NotCompleted",
    "PipelineResult",
    "Reply",
    "ScriptError",
    "ScriptedModel",
    "ToolCall",
    "ToolResult",
    "Wait",
]

OutT = TypeVar("OutT", bound=BaseModel)
SCRIPTED_MODEL_NAME = "scripted-model"


class HarnessError(OrchestratorError):
    """A mistake of the test, not of the agent: raised by the harness, never a step failure."""


class NeedsServers(HarnessError):
    """The step needed Postgres (a non-idempotent tool, memory search): fake it, or use
    a ``Worker`` on real servers."""


class ScriptError(HarnessError):
    """The scripted model has no answer for a request, or an answer that does not fit."""


class NotCompleted(HarnessError):
    """``AgentResult.output`` of a run that parked or failed."""


# ---------------------------------------------------------------------------------------
# The scripted model
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A tool the scripted model called, with its arguments and what it returned."""

    tool: str
    args: dict[str, Any]
    result: Any


@dataclass(slots=True)
class ModelCall:
    """One request the scripted model got: the request, the output type, the tools
    offered (``parse_with_tools``), the tool results of its scripted calls, its answer."""

    request: ModelRequest
    output: type[BaseModel]
    tools: tuple[str, ...] = ()
    tool_results: list[ToolResult] = field(default_factory=list)
    answer: BaseModel | None = None

    @property
    def purpose(self) -> str:
        """The request's purpose (``"triage"``, ``"reply"``)."""
        return self.request.purpose


# What a script entry answers: the output (a model or a dict validated into the output
# type), a function of the call that returns one, or an exception to raise.
Answer: TypeAlias = (
    BaseModel
    | Mapping[str, Any]
    | BaseException
    | Callable[[ModelCall], BaseModel | Mapping[str, Any]]
)


@dataclass(frozen=True, slots=True)
class Reply:
    """A script entry with more than an answer: ``tool_calls`` (name, arguments) for the
    model to make first, in order, through the step's tool ledger (only when the agent
    offered tools with ``parse_with_tools``), and the ``usage`` to report. A callable
    ``answer`` sees the call's ``tool_results``."""

    answer: Answer
    tool_calls: Sequence[tuple[str, Mapping[str, Any]]] = ()
    usage: Usage = field(default_factory=Usage)


Entry: TypeAlias = Reply | Answer
Script: TypeAlias = Sequence[Entry] | Mapping[str, Entry | Sequence[Entry]]


class ScriptedModel:
    """A ``LanguageModel`` that answers from a script and records every request.

    ``script`` is either a sequence of entries, answered in order whatever the
    request's purpose, or a mapping from purpose to entries: a sequence (list, tuple) is
    used in order, a single entry answers every request of that purpose. Answers for the
    request's purpose come first, then the ordered ones. An entry is an answer
    (see ``Answer``) or a ``Reply``. A request with no answer left raises
    ``ScriptError``; so does an answer that does not fit the requested output type.

    ``calls`` (and ``requests``) record what the agents asked, for assertions on
    prompts. One model may serve several runs: its script is consumed across them.
    """

    def __init__(self, script: Script = (), *, name: str = SCRIPTED_MODEL_NAME) -> None:
        self.name = name
        self.calls: list[ModelCall] = []
        self._ordered: deque[Entry] = deque()
        self._queued: dict[str, deque[Entry]] = {}
        self._repeated: dict[str, Entry] = {}
        if isinstance(script, Mapping):
            for purpose, entries in script.items():
                if isinstance(entries, Sequence):
                    self._queued[purpose] = deque(entries)
                else:
                    self._repeated[purpose] = entries
        else:
            self._ordered.extend(script)

    @property
    def requests(self) -> list[ModelRequest]:
        """Every request received, in order."""
        return [call.request for call in self.calls]

    @property
    def unused(self) -> int:
        """Scripted answers not used yet (repeated ones do not count)."""
        return len(self._ordered) + sum(len(q) for q in self._queued.values())

    def assert_all_used(self) -> None:
        """Fail when scripted answers were left over (the agent asked less than expected)."""
        if self.unused:
            raise AssertionError(f"{self.unused} scripted answer(s) were never asked for")

    async def complete(
        self,
        request: ModelRequest,
        output: type[T],
        tools: Sequence[ToolDef] = (),
        run_tool: ToolRunner | None = None,
        max_turns: int = 6,
    ) -> Completion[T]:
        """Answer ``request`` from the script, making its tool calls first."""
        call = ModelCall(request, output, tuple(t.name for t in tools))
        self.calls.append(call)
        entry = self._next(request)
        reply = entry if isinstance(entry, Reply) else Reply(entry)
        if reply.tool_calls and run_tool is None:
            raise AgentError(
                f"scripted model: the answer to {request.purpose!r} calls tools, but the "
                "agent offered none (it called parse, not parse_with_tools)"
            )
        for name, args in reply.tool_calls:
            assert run_tool is not None
            result = await run_tool(name, dict(args))
            call.tool_results.append(ToolResult(name, dict(args), result))
        answer = reply.answer
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer) and not isinstance(answer, BaseModel):
            answer = answer(call)
        value = _fit(output, answer, len(self.calls), request.purpose)
        call.answer = value
        return Completion(value, reply.usage)

    def _next(self, request: ModelRequest) -> Entry:
        purpose = request.purpose
        queued = self._queued.get(purpose)
        if queued:
            return queued.popleft()
        if purpose in self._repeated:
            return self._repeated[purpose]
        if self._ordered:
            return self._ordered.popleft()
        scripted = sorted({*self._queued, *self._repeated})
        raise ScriptError(
            f"scripted model: no answer left for request {len(self.calls)} "
            f"(purpose {purpose!r}; scripted purposes: {', '.join(scripted) or 'none'})"
        )


def _fit(output: type[T], answer: object, n: int, purpose: str) -> T:
    if isinstance(answer, output):
        return answer
    try:
        if isinstance(answer, BaseModel):
            return output.model_validate(answer.model_dump())
        return output.model_validate(answer)
    except ValidationError as exc:
        raise ScriptError(
            f"scripted model: answer {n} (purpose {purpose!r}) does not fit "
            f"{output.__name__}: {exc}"
        ) from exc


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of a step, as the ledger keyed it: ``error`` is set when it failed."""

    tool: str
    args: dict[str, Any]
    key: str
    ordinal: int
    result: Any = None
    error: str | None = None
    faked: bool = False

    @property
    def ok(self) -> bool:
        """Whether the call succeeded."""
        return self.error is None


@dataclass(frozen=True, slots=True)
class Wait:
    """A durable wait a step reached: ``ctx.ask`` (the signal ``"input"``),
    ``ctx.wait_for`` or ``ctx.sleep``, and how it ended in the harness.

    ``seconds`` is the sleep's delay or the wait's timeout; ``payload`` the reply or
    signal taken. ``outcome`` is ``"parked"`` when nothing was scripted for it and it
    had no timeout: the run stopped there.
    """

    agent: str
    kind: Literal["ask", "signal", "sleep"]
    outcome: Literal["answered", "timed_out", "slept", "parked"]
    name: str | None = None
    question: str | None = None
    seconds: float | None = None
    payload: Any = None


@dataclass(slots=True)
class AgentResult(Generic[OutT]):
    """One step run by the harness.

    ``value`` is the agent's output (None when it parked or failed; ``output`` raises
    then), ``input_state`` the workflow state the step started from, ``state`` the state
    after it (its input state when it did not complete), ``next`` the agents it hands
    on to (``route()``, else the pipeline's next), ``messages`` its transcript lines
    (``ctx.say``), ``attempts`` how many executions it took (``run_pipeline`` retries).
    """

    agent: str
    seq: int
    workflow_id: UUID
    value: OutT | None
    input_state: dict[str, Any]
    state: dict[str, Any]
    next: tuple[str, ...] = ()
    messages: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)
    model_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    attempts: int = 1
    parked: Wait | None = None
    error: Exception | None = None
    # What the step did with memory (type, data), as a worker commits it with the step.
    memory_events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def output(self) -> OutT:
        """The agent's output; raises ``NotCompleted`` if the step parked or failed."""
        if self.value is None:
            why = (
                f"parked on {self.parked.kind} {self.parked.question or self.parked.name!r}"
                if self.parked is not None
                else f"failed: {self.error!r}"
            )
            raise NotCompleted(f"step {self.seq} ({self.agent}) has no output: it {why}")
        return self.value

    @property
    def completed(self) -> bool:
        """Whether the step produced its output."""
        return self.value is not None


@dataclass(slots=True)
class PipelineResult:
    """A workflow run by the harness: its status (``COMPLETED``, ``WAITING`` when a step
    parked on a wait with nothing scripted, ``FAILED``), final state and every step."""

    pipeline: str
    workflow_id: UUID
    status: WorkflowStatus
    state: dict[str, Any]
    steps: list[AgentResult[Any]]
    waiting: Wait | None = None
    error: Exception | None = None

    @property
    def agents(self) -> list[str]:
        """The agents of the steps run, in the order they ran."""
        return [s.agent for s in self.steps]

    @property
    def transcript(self) -> list[str]:
        """Every step's transcript lines, in the order the steps ran."""
        return [m for s in self.steps for m in s.messages]

    @property
    def tool_calls(self) -> list[ToolCall]:
        """Every step's tool calls, in the order the steps ran."""
        return [c for s in self.steps for c in s.tool_calls]

    def step(self, agent: str) -> AgentResult[Any]:
        """The last step of ``agent``; KeyError when it did not run."""
        ran: list[AgentResult[Any]] = [s for s in self.steps if s.agent == agent]
        if ran:
            return ran[-1]
        raise KeyError(f"no step of agent {agent!r} ran (ran: {', '.join(self.agents)})")


# ---------------------------------------------------------------------------------------
# Services and context without servers
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Registry:
    tools: Mapping[str, ToolSpec]
    version: str


@dataclass(frozen=True, slots=True)
class _Services:
    """A ``StepServices`` with no database: what a step needs, in process."""

    app: _Registry
    settings: Settings
    model: LanguageModel
    embedder: Embedder
    tracer: Tracer = field(default_factory=NoOpTracer)
    metrics: Metrics = field(default_factory=Metrics)
    pricing: Pricing = field(default_factory=Pricing)
    crash: CrashPoints = field(default_factory=lambda: CrashPoints(None, 1))
    model_limiter: Limiter | None = None

    @property
    def store(self) -> Store:
        raise NeedsServers(
            "AgentHarness has no database: this step needed Postgres. Non-idempotent tools "
            "need a Worker on real Redis and Postgres; in a harness, fake the tool by name: "
            "AgentHarness(app, tools={'name': fake}); ctx.memory.recall() ranks "
            "AgentHarness(memory=[...])"
        )

    # ``_HarnessMemory`` serves ctx.memory from the test's data: nothing reaches these.
    @property
    def working_memory(self) -> WorkingMemoryCache:
        raise NeedsServers(_NO_REDIS)

    @property
    def recall_cache(self) -> RecallCache:
        raise NeedsServers(_NO_REDIS)


_NO_REDIS = (
    "AgentHarness has no Redis: ctx.memory works on AgentHarness(transcript=..., "
    "memory=...); anything else needs a Worker on real Redis and Postgres"
)


class _HarnessMemory(SessionMemory):
    """``ctx.memory`` on the test's data: working memory is the given lines (the
    harness's transcript, then this run's earlier steps), recall ranks the given memory
    items by cosine similarity; nothing is read from or written to a server."""

    def __init__(
        self,
        services: _Services,
        info: StepInfo,
        lines: Sequence[Line],
        memories: Sequence[Memory],
    ) -> None:
        super().__init__(services, info)
        self._embedder = services.embedder
        self._lines = tuple(lines)
        self._memories = tuple(memories)
        self._max_bytes = services.settings.working_memory_max_bytes - wm.KEY_OVERHEAD_BYTES

    async def working(self) -> WorkingMemory:
        """The given lines as working memory (cut to the byte cap), with this step's goal
        and recalled memories; recorded as a hydration, as a worker's first read is."""
        if self._value is None:
            lines = tuple(
                replace(m, content=wm.truncate(m.content, MESSAGE_CHARS)) for m in self._lines
            )
            self._value = WorkingMemory(
                str(self.info.workflow_id), self.info.seq - 1, messages=lines
            ).fit(self._max_bytes)
            self._events.append(
                (
                    HYDRATED,
                    {
                        "reason": "harness",
                        "messages": len(self._value.messages),
                        "sessions": 1,
                        "tools": 0,
                        "goal": False,
                    },
                )
            )
        return self._with_mine(self._value)

    async def recall(
        self, query: str, *, k: int = 5, kinds: Sequence[str] | None = None
    ) -> list[Memory]:
        """The ``k`` given memory items (of ``kinds``) most similar to ``query``."""
        pool = [m for m in self._memories if kinds is None or m.kind in kinds]
        if not pool:
            found: list[Memory] = []
        else:
            query_vec, *vectors = await self._embedder.embed_many(
                [query, *(m.content for m in pool)]
            )
            scored = [
                replace(m, score=_cosine(query_vec, v), vector_score=_cosine(query_vec, v))
                for m, v in zip(pool, vectors, strict=True)
            ]
            found = sorted(scored, key=lambda m: -m.score)[:k]
        for m in found:
            self._recalled.append(
                Recalled(m.id, m.kind, wm.truncate(m.content, RECALLED_CHARS), m.score)
            )
        record = {
            "query": query,
            "mode": "harness",
            "cached": False,
            "memories": [
                {"id": m.id, "kind": m.kind, "key": m.key, "score": m.score} for m in found
            ],
        }
        self._events.append((RECALLED, record))
        return found

    def append_in(
        self, pipe: Any, *, said: Sequence[str] = (), runs: Sequence[ToolRun] = ()
    ) -> None:
        """Nothing: a harness has no Redis."""


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


class _Inbox:
    """The signals of one harness run (a workflow): each taken once, in order, per name."""

    def __init__(self, signals: Iterable[tuple[str, Any]]) -> None:
        self._queues: defaultdict[str, deque[Any]] = defaultdict(deque)
        for name, payload in signals:
            self._queues[name].append(payload)

    def take(self, name: str) -> tuple[bool, Any]:
        queue = self._queues.get(name)
        if not queue:
            return False, None
        return True, queue.popleft()


class _HarnessContext(StepContext):
    """The step context with waits answered from the harness's script.

    ``replay`` is shared by every attempt of one step: a retried step gets the replies
    and signals its earlier attempts took, by wait ordinal, as a worker replays them.
    """

    def __init__(
        self,
        services: _Services,
        info: StepInfo,
        state: Mapping[str, Any],
        recorded: Mapping[int, ToolRun],
        allowed: tuple[str, ...],
        inbox: _Inbox,
        replay: dict[int, Wait],
        lines: Sequence[Line] = (),
        memories: Sequence[Memory] = (),
    ) -> None:
        super().__init__(services, info, state, recorded, allowed)
        self._registry = services.app
        self._may_use = allowed
        self._inbox = inbox
        self._replay = replay
        self.reached: list[Wait] = []
        self._harness_memory = _HarnessMemory(services, info, lines, memories)

    @property
    def memory(self) -> SessionMemory:
        """Working memory and recall on the harness's data (see ``_HarnessMemory``)."""
        return self._harness_memory

    def ask(self, question: str, *, timeout: timedelta | float | None = None) -> str:
        """The next scripted reply (the signal ``"input"``)."""
        wait = self._wait("ask", INPUT_SIGNAL, _seconds(timeout), question)
        return str(wait.payload)

    async def wait_for(self, name: str, *, timeout: timedelta | float | None = None) -> Any:
        """The next scripted signal ``name``."""
        return self._wait("signal", name, _seconds(timeout), None).payload

    async def sleep(self, delay: timedelta | float) -> None:
        """Returns at once; the sleep is recorded."""
        ordinal = self.waited
        self.waited += 1
        wait = Wait(self.info.agent, "sleep", "slept", seconds=_seconds(delay))
        self._check_replay(ordinal, wait)
        self._replay[ordinal] = wait
        self.reached.append(wait)

    async def cancelled(self) -> bool:
        """Never cancelled in a harness."""
        return self.superseded

    async def tool(self, name: str, /, **args: Any) -> Any:
        """As at runtime, but a non-idempotent tool with no fake needs servers."""
        spec = self._registry.tools.get(name)
        allowed = not self._may_use or name in self._may_use
        if spec is not None and allowed and not spec.idempotent:
            raise NeedsServers(
                f"tool {name!r} is not idempotent: its call is recorded in Postgres before it "
                "runs, so it needs a Worker on real servers; in a harness, fake it: "
                f"AgentHarness(app, tools={{{name!r}: fake}})"
            )
        return await super().tool(name, **args)

    def _wait(
        self, kind: Literal["ask", "signal"], name: str, seconds: float | None, question: str | None
    ) -> Wait:
        ordinal = self.waited
        self.waited += 1
        agent = self.info.agent
        wait = self._replay.get(ordinal)
        if wait is None:
            found, payload = self._inbox.take(name)
            if found:
                wait = Wait(agent, kind, "answered", name, question, seconds, payload)
            elif seconds is not None:
                wait = Wait(agent, kind, "timed_out", name, question, seconds)
            else:
                parked = Wait(agent, kind, "parked", name, question)
                self.reached.append(parked)
                raise Parked(name=name, delay=None, question=question)
            self._replay[ordinal] = wait
        else:
            self._check_replay(ordinal, Wait(agent, kind, wait.outcome, name))
        self.reached.append(wait)
        if wait.outcome == "timed_out":
            raise WaitTimedOut(name, seconds or 0.0)
        return wait

    def _check_replay(self, ordinal: int, now: Wait) -> None:
        before = self._replay.get(ordinal)
        if before is not None and (before.kind, before.name) != (now.kind, now.name):
            raise NonDeterminismError(
                f"non-determinism: wait {ordinal} was {before.kind} {before.name!r} in an "
                f"earlier attempt, now {now.kind} {now.name!r}",
                agent=self.info.agent,
            )


def _seconds(value: timedelta | float | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value


def _fake_spec(real: ToolSpec, fake: Callable[..., Any]) -> ToolSpec:
    """``fake`` in place of ``real``: the model sees the real tool's definition, the fake
    gets the runtime parameters (``idempotency_key``, ``fencing_token``) when it declares
    them, and its calls ride the ledger as idempotent ones (no database)."""
    params = inspect.signature(fake).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    async def call(**kwargs: Any) -> Any:
        given = {
            k: v for k, v in kwargs.items() if k not in RUNTIME_PARAMS or k in params or takes_all
        }
        result = fake(**given)
        return await result if inspect.isawaitable(result) else result

    call.__signature__ = inspect.signature(real.fn)  # type: ignore[attr-defined]
    call.__doc__ = inspect.getdoc(real.fn)
    return ToolSpec(
        real.name,
        call,
        idempotent=True,
        takes_key=real.takes_key or "idempotency_key" in params,
        takes_token=real.takes_token or "fencing_token" in params,
        timeout=real.timeout,
    )


def _jsonable_state(value: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    """The workflow state as JSON, as a worker sees it (models dumped, tuples as lists)."""
    raw = value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)
    state: dict[str, Any] = to_jsonable_python(raw)
    return state


# ---------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------

Signals: TypeAlias = Mapping[str, Any] | Iterable[tuple[str, Any]]


@dataclass(slots=True)
class _Flow:
    """One pipeline run: the workflow's state, open branches, pending join, step numbers."""

    pipeline: Pipeline
    workflow_id: UUID
    tenant: str
    inbox: _Inbox
    state: dict[str, Any]
    limit: int
    next_seq: int = 1
    open_steps: int = 1
    join: tuple[str, int] | None = None  # the pending join: its agent and step number
    steps: list[AgentResult[Any]] = field(default_factory=list)
    ready: deque[tuple[int, str, str, dict[str, Any]]] = field(default_factory=deque)
    status: WorkflowStatus = WorkflowStatus.RUNNING
    waiting: Wait | None = None
    error: Exception | None = None
    opening: str = ""  # the submitted input, the transcript's first line (as at submit)


class AgentHarness:
    """Runs agents of ``app`` in process, on no servers.

    ``model``: the language model (default: the app's offline rules, as a worker with
    no API key uses); a ``ScriptedModel`` lets a test script each answer and assert on
    prompts. ``tools``: fakes by tool name (async or plain functions) in place of
    registered tools; a name the app does not register is an error. ``signals``: the
    signals sent to each run's workflow before it starts (a mapping, or (name, payload)
    pairs to send several of one name); ``replies``: the replies to ``ctx.ask``, in
    order (the signal ``"input"``, after any given in ``signals``). Each ``run`` and
    ``run_pipeline`` starts from these afresh. ``settings`` supplies ``max_steps``,
    ``max_attempts`` and the tool timeout (default: ``Settings()``). ``transcript``: the
    customer's earlier lines (``Line``, or text said by the customer) that
    ``ctx.memory`` shows before this run's own; ``memory``: the long-term memories
    ``ctx.memory.recall`` ranks (``store.memory.Memory`` items).
    """

    def __init__(
        self,
        app: App,
        *,
        model: LanguageModel | None = None,
        tools: Mapping[str, Callable[..., Any]] | None = None,
        signals: Signals | None = None,
        replies: Sequence[str] = (),
        settings: Settings | None = None,
        embedder: Embedder | None = None,
        transcript: Sequence[Line | str] = (),
        memory: Sequence[Memory] = (),
    ) -> None:
        app.validate()
        self.app = app
        self.model: LanguageModel = model if model is not None else OfflineModel(app.offline_rules)
        self.settings = settings or Settings()
        fakes = dict(tools or {})
        unknown = sorted(set(fakes) - set(app.tools))
        if unknown:
            raise ConfigurationError(
                f"fake tool(s) {', '.join(unknown)}: app {app.name!r} registers no tool of "
                f"that name (it has {', '.join(sorted(app.tools)) or 'none'})"
            )
        self.faked = frozenset(fakes)
        registry = {
            name: _fake_spec(spec, fakes[name]) if name in fakes else spec
            for name, spec in app.tools.items()
        }
        self._services = _Services(
            _Registry(registry, app.version),
            self.settings,
            self.model,
            embedder or LexicalEmbedder(),
        )
        pairs = list(signals.items() if isinstance(signals, Mapping) else signals or ())
        self._signals = [*pairs, *((INPUT_SIGNAL, r) for r in replies)]
        self.transcript = [
            Line("customer", "customer", m) if isinstance(m, str) else m for m in transcript
        ]
        self.memory = list(memory)

    @overload
    async def run(
        self,
        agent: type[Agent[Any, OutT]],
        state: BaseModel | Mapping[str, Any],
        *,
        pipeline: str | None = ...,
        tenant: str = ...,
        seq: int = ...,
        raises: bool = ...,
    ) -> AgentResult[OutT]: ...

    @overload
    async def run(
        self,
        agent: str,
        state: BaseModel | Mapping[str, Any],
        *,
        pipeline: str | None = ...,
        tenant: str = ...,
        seq: int = ...,
        raises: bool = ...,
    ) -> AgentResult[Any]: ...

    async def run(
        self,
        agent: type[Agent[Any, Any]] | str,
        state: BaseModel | Mapping[str, Any],
        *,
        pipeline: str | None = None,
        tenant: str = "default",
        seq: int = 0,
        raises: bool = True,
    ) -> AgentResult[Any]:
        """Run one step of ``agent`` (a class, or a registered name) on ``state``.

        ``state`` is the workflow state the step starts from (earlier agents' outputs
        under their names, the input under the pipeline's input key), or an instance of
        the agent's input model. ``next`` follows ``route()``, else ``pipeline`` (default:
        the app's default pipeline if it has the agent, else the first that has it). What
        the agent raises is raised (``raises=False``: kept in ``error``); a wait with
        nothing scripted ends the run with ``parked`` set.
        """
        cls = self._agent(agent)
        route_by = self._pipeline_of(cls.name, pipeline)
        info = StepInfo(uuid4(), uuid4(), seq, cls.name, 1, tenant, "test", route_by.name)
        result, _ = await self._attempt(
            cls, _jsonable_state(state), info, _Inbox(self._signals), {}, {}, route_by
        )
        if result.error is not None and raises:
            raise result.error
        return result

    async def run_pipeline(
        self,
        pipeline: str | Pipeline | None,
        input: BaseModel | Mapping[str, Any] | str,
        *,
        concurrent: bool = False,
        tenant: str | None = None,
    ) -> PipelineResult:
        """Run a workflow of ``pipeline`` (None: the app's default) on ``input`` to its end.

        Follows routing as a worker does: forks start branches, a join runs once on the
        merged state when every branch has ended, the step limit fails a routing loop,
        a failed step is retried up to its ``max_attempts``. Stops at the first wait
        that has nothing scripted (status ``WAITING``, the wait in ``waiting``) or at a
        failure (``FAILED``, the exception in ``error``). ``concurrent``: run each wave
        of ready branches at once instead of one by one. A plain-text ``input`` goes
        through the pipeline's ``from_text``.
        """
        declared = (
            pipeline if isinstance(pipeline, Pipeline) else self.app.resolve_pipeline(pipeline)
        )
        if isinstance(input, str):
            if declared.from_text is None:
                raise ConfigurationError(f"pipeline {declared.name!r} takes no plain text")
            input = declared.from_text(input)
        given = getattr(input, "tenant_id", None) or (
            input.get("tenant_id") if isinstance(input, Mapping) else None
        )
        flow = _Flow(
            declared,
            uuid4(),
            tenant or (given if isinstance(given, str) else None) or "default",
            _Inbox(self._signals),
            {declared.input_key: declared.validate_input(input)},
            declared.max_steps or self.settings.max_steps,
        )
        flow.opening = (
            str(input) if isinstance(input, BaseModel) else json.dumps(dict(input), default=str)
        )
        flow.ready.append((0, declared.agents[0], "submit", dict(flow.state)))
        while flow.ready and flow.status is WorkflowStatus.RUNNING:
            if concurrent:
                wave = list(flow.ready)
                flow.ready.clear()
                results = await self._wave(flow, wave)
            else:
                results = [await self._step(flow, *flow.ready.popleft())]
            for result in results:
                self._settle(flow, result)
        if flow.status is WorkflowStatus.RUNNING:
            flow.status = WorkflowStatus.COMPLETED
        return PipelineResult(
            declared.name,
            flow.workflow_id,
            flow.status,
            flow.state,
            flow.steps,
            flow.waiting,
            flow.error,
        )

    async def _wave(
        self, flow: _Flow, wave: list[tuple[int, str, str, dict[str, Any]]]
    ) -> list[AgentResult[Any]]:
        """The ready steps at once; their results in the wave's (step) order."""
        results: dict[int, AgentResult[Any]] = {}
        mistakes: list[HarnessError] = []

        async def one(i: int, step: tuple[int, str, str, dict[str, Any]]) -> None:
            try:
                results[i] = await self._step(flow, *step)
            except HarnessError as exc:
                mistakes.append(exc)

        async with anyio.create_task_group() as tg:
            for i, step in enumerate(wave):
                tg.start_soon(one, i, step)
        if mistakes:
            raise mistakes[0]
        return [results[i] for i in range(len(wave))]

    async def _step(
        self, flow: _Flow, seq: int, agent: str, assigned_by: str, state: dict[str, Any]
    ) -> AgentResult[Any]:
        """One step with its retries (at once, tool results and waits replayed)."""
        cls = self.app.agents[agent]
        max_attempts = cls.max_attempts or self.settings.max_attempts
        recorded: dict[int, ToolRun] = {}
        replay: dict[int, Wait] = {}
        step_id = uuid4()
        attempt = 1
        while True:
            info = StepInfo(
                flow.workflow_id,
                step_id,
                seq,
                agent,
                attempt,
                flow.tenant,
                assigned_by,
                flow.pipeline.name,
            )
            earlier = [
                Line("customer", "customer", flow.opening),
                *(Line("agent", s.agent, m) for s in flow.steps for m in s.messages),
            ]
            result, recorded = await self._attempt(
                cls, state, info, flow.inbox, recorded, replay, flow.pipeline, earlier
            )
            result.attempts = attempt
            error = result.error
            if error is None or attempt >= max_attempts or not _retryable(error):
                return result
            attempt += 1

    def _settle(self, flow: _Flow, result: AgentResult[Any]) -> None:
        """What a worker commits when a step ends, as ``store.branches`` settles it."""
        flow.steps.append(result)
        if result.parked is not None:  # the run stops after this wave; the step stays open
            flow.waiting = flow.waiting or result.parked
            if flow.status is WorkflowStatus.RUNNING:
                flow.status = WorkflowStatus.WAITING
            return
        refused = None if result.error is not None else self._refusal(flow, result)
        if refused is not None:  # the handoff fails the step, as its commit would
            result.error, result.value, result.next = refused, None, ()
            result.state = result.input_state
        if result.error is None:
            self._hand_on(flow, result)
        elif not self._branch_failed(flow, result.agent, result.error):
            return
        flow.open_steps -= 1
        if flow.open_steps == 0 and flow.join is not None:
            agent, seq = flow.join
            flow.join, flow.open_steps = None, 1
            flow.ready.append((seq, agent, result.agent, dict(flow.state)))

    def _refusal(self, flow: _Flow, result: AgentResult[Any]) -> StepError | None:
        """Why a worker would refuse the step's routing: the step limit, a second join."""
        if result.next and flow.next_seq + len(result.next) > flow.limit:
            return StepLimitReached(
                f"step limit reached: the workflow has run {flow.next_seq} steps and may run "
                f"{flow.limit} (pipeline {flow.pipeline.name!r}); routing to "
                f"{', '.join(result.next)} refused",
                agent=result.agent,
            )
        joins = [a for a in result.next if self.app.agents[a].join]
        if flow.join is not None and any(a != flow.join[0] for a in joins):
            return AgentError(
                f"routes to join {joins[0]!r} while join {flow.join[0]!r} is pending; "
                "a workflow has one join at a time",
                non_retryable=True,
            )
        return None

    def _hand_on(self, flow: _Flow, result: AgentResult[Any]) -> None:
        """Merge the step's state; start its next steps (each a branch) or reach the join."""
        flow.state.update(result.state)
        for agent in result.next:
            if self.app.agents[agent].join:
                if flow.join is None:
                    flow.join = (agent, flow.next_seq)
                    flow.next_seq += 1
                continue
            flow.ready.append((flow.next_seq, agent, result.agent, dict(result.state)))
            flow.next_seq += 1
            flow.open_steps += 1

    def _branch_failed(self, flow: _Flow, agent: str, error: Exception) -> bool:
        """A step failed for good: only its branch ends (True) when its join tolerates
        failed branches; otherwise the workflow fails (False)."""
        branched = flow.open_steps > 1 or flow.join is not None
        if not (branched and self._tolerates(flow.pipeline)):
            flow.status, flow.error = WorkflowStatus.FAILED, flow.error or error
            return False
        errors = dict(flow.state.get("branch_errors") or {})
        errors[agent] = f"{type(error).__name__}: {error}"[:2000]
        flow.state["branch_errors"] = errors
        return True

    def _tolerates(self, pipeline: Pipeline) -> bool:
        return any(
            self.app.agents[a].join and self.app.agents[a].optional_branches
            for a in pipeline.agents
            if a in self.app.agents
        )

    async def _attempt(
        self,
        cls: type[Agent[Any, Any]],
        state: dict[str, Any],
        info: StepInfo,
        inbox: _Inbox,
        recorded: Mapping[int, ToolRun],
        replay: dict[int, Wait],
        pipeline: Pipeline,
        earlier: Sequence[Line] = (),
    ) -> tuple[AgentResult[Any], dict[int, ToolRun]]:
        """One execution of one step, as ``engine.protocol`` runs it; never raises what
        the agent raised (it is kept in ``error``), but raises ``HarnessError``."""
        ctx = _HarnessContext(
            self._services,
            info,
            state,
            recorded,
            cls.tools,
            inbox,
            replay,
            [*self.transcript, *earlier],
            self.memory,
        )
        result: AgentResult[Any] = AgentResult(
            cls.name, info.seq, info.workflow_id, None, state, state
        )
        agent = cls()  # one instance for run, state_update and route, as a worker does
        try:
            output = await self._execute(agent, ctx, state)
            agent_state = {**state, **agent.state_update(output)}
            result.next = self._route(agent, output, pipeline)
            result.value, result.state = output, agent_state
        except Parked:
            result.parked = ctx.reached[-1]
        except HarnessError:
            raise
        except Exception as exc:
            result.error = exc
        runs = {**recorded, **{r.ordinal: r for r in ctx.tool_runs}}
        result.tool_calls = [self._call(run) for _, run in sorted(runs.items())]
        result.messages, result.waits = ctx.messages, ctx.reached
        result.model_calls, result.usage = ctx.model_calls, ctx.usage
        result.memory_events = ctx.memory.record()
        return result, runs

    @staticmethod
    async def _execute(agent: Agent[Any, Any], ctx: StepContext, state: dict[str, Any]) -> Any:
        return await run_agent(agent, ctx, state)

    def _route(
        self, agent: Agent[Any, Any], output: BaseModel, pipeline: Pipeline
    ) -> tuple[str, ...]:
        chosen = agent.route(output)
        if chosen is None:
            agents = pipeline.agents
            i = agents.index(agent.name) if agent.name in agents else len(agents)
            chosen = agents[i + 1 : i + 2]
        unknown = [a for a in chosen if a not in self.app.agents]
        if unknown:
            raise AgentError(
                f"routes to unknown agent(s): {', '.join(unknown)}", non_retryable=True
            )
        return tuple(dict.fromkeys(chosen))

    def _call(self, run: ToolRun) -> ToolCall:
        return ToolCall(
            run.tool, run.args, run.key, run.ordinal, run.result, run.error, run.tool in self.faked
        )

    def _agent(self, agent: type[Agent[Any, Any]] | str) -> type[Agent[Any, Any]]:
        if not isinstance(agent, str):
            return agent
        if agent not in self.app.agents:
            known = ", ".join(sorted(self.app.agents)) or "none"
            raise ConfigurationError(f"no agent {agent!r} in app {self.app.name!r} ({known})")
        return self.app.agents[agent]

    def _pipeline_of(self, agent: str, name: str | None) -> Pipeline:
        if name is not None:
            return self.app.resolve_pipeline(name)
        default = self.app.default_pipeline
        candidates = [default] if default else []
        candidates += sorted(p for p in self.app.pipelines if p != default)
        for candidate in candidates:
            if agent in self.app.pipelines[candidate].agents:
                return self.app.pipelines[candidate]
        return Pipeline("", (agent,))


def _retryable(error: Exception) -> bool:
    return not (isinstance(error, StepError) and error.non_retryable)
