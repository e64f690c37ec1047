"""The step context: what a running agent sees and calls (``ctx``).

Read the current context anywhere inside a step with ``current()``, as
Temporal's activity API does; outside a step it fails clearly.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import timedelta
from typing import Any

from orchestrator import tracing
from orchestrator.errors import (
    NonDeterminismError,
    OrchestratorError,
    Parked,
    ToolError,
    WaitTimedOut,
)
from orchestrator.models.llm import ModelRequest, T, ToolDef, ToolRunner, Usage
from orchestrator.schemas import WorkflowStatus
from orchestrator.step.budget import StepBudget
from orchestrator.step.info import StepInfo
from orchestrator.step.ledger import ToolLedger
from orchestrator.step.memory import SessionMemory
from orchestrator.step.services import StepServices
from orchestrator.store.tool_runs import ToolRun

INPUT_SIGNAL = "input"  # the signal ctx.ask() waits for: a person's reply
_current: ContextVar[StepContext] = ContextVar("orchestrator_step_context")


class StepContext:
    """``ctx``: what a running agent sees (``info``, ``state``) and calls (tools, model, waits,
    transcript)."""

    def __init__(
        self,
        services: StepServices,
        info: StepInfo,
        state: Mapping[str, Any],
        recorded: Mapping[int, ToolRun],
        allowed_tools: tuple[str, ...],
        waits: Sequence[float | None] = (),
        signals: Mapping[int, tuple[str, Any]] | None = None,
        budget: StepBudget | None = None,
    ) -> None:
        self.info = info
        self.state = state
        self._services = services
        self._ledger = ToolLedger(services, info, recorded)
        self._allowed = allowed_tools
        self._waits = list(waits)  # due times of this step's durable waits, by ordinal
        self._signals = dict(signals or {})  # (name, payload) taken by each wait ordinal
        self.waited = 0  # waits reached by this run: the ordinal of the next one
        self.messages: list[str] = []  # transcript lines, committed with the step
        self.usage = Usage()  # tokens of this step's model calls, recorded with its attempt
        self.model_calls = 0
        self.superseded = False  # set when the fence moved on (this run's writes are refused)
        self.budget = budget  # the tenant's model budget, if it has one
        self._memory: SessionMemory | None = None

    @property
    def memory(self) -> SessionMemory:
        """The session's working memory, the customer's transcript and long-term recall."""
        if self._memory is None:
            self._memory = SessionMemory(self._services, self.info)
        return self._memory

    @property
    def model(self) -> StepModel:
        """The model, behind this tenant's rate limit, recording this step's usage."""
        return StepModel(self)

    async def cancelled(self) -> bool:
        """Whether this run should stop (check it in long steps): its workflow was
        cancelled, or another execution of the step superseded this one."""
        if self.superseded:
            return True
        status = await self._services.store.workflow_status(self.info.workflow_id)
        return status is WorkflowStatus.CANCELLED

    def ask(self, question: str, *, timeout: timedelta | float | None = None) -> str:
        """Ask the customer; returns the reply once there is one.

        Without a reply yet, the step stops here and the workflow waits, durably and
        without holding a worker, until ``orchestrator input`` (``Client.provide_input``:
        the signal ``"input"``) delivers one; then the step runs again from its start,
        with recorded tool results reused, and this call returns the reply. With
        ``timeout`` and no reply in time, raises ``WaitTimedOut``.
        """
        seconds = _seconds(timeout)
        ordinal = self._next_wait()
        taken = self._taken(ordinal, INPUT_SIGNAL)
        if taken is not None:
            return str(taken[1])
        recorded = self._recorded(ordinal)
        due = self._waits[ordinal] if recorded else None
        if due is not None and time.time() >= due:
            raise WaitTimedOut(INPUT_SIGNAL, seconds or 0.0)
        raise Parked(name=INPUT_SIGNAL, delay=seconds, due=due, question=question, new=not recorded)

    async def wait_for(self, name: str, *, timeout: timedelta | float | None = None) -> Any:
        """Wait, durably, for the signal ``name``; return its payload.

        A signal sent before this wait is kept and returned at once. Otherwise the
        step parks without holding a worker until ``client.signal(workflow, name,
        payload)`` (or ``orchestrator signal``) sends one, and then runs again from its
        start (recorded tool results reused) to get here. With ``timeout`` and no
        signal in time, raises ``WaitTimedOut`` (catch it to carry on without one).
        """
        seconds = _seconds(timeout)
        ordinal = self._next_wait()
        taken = self._taken(ordinal, name)
        if taken is not None:
            return taken[1]
        recorded = self._recorded(ordinal)
        due = self._waits[ordinal] if recorded else None
        info = self.info
        found, payload = await self._services.store.take_signal(
            info.workflow_id, info.step_id, info.attempt, name=name, ordinal=ordinal, deadline=due
        )
        if found:
            self._signals[ordinal] = (name, payload)
            return payload
        if due is not None and time.time() >= due:
            raise WaitTimedOut(name, seconds or 0.0)
        raise Parked(name=name, delay=seconds, due=due, new=not recorded)

    async def sleep(self, delay: timedelta | float) -> None:
        """Sleep, durably: the step parks without holding a worker and runs again (from
        its start, recorded tool results reused) once ``delay`` has passed, across
        restarts and the loss of Redis."""
        seconds = _seconds(delay) or 0.0
        ordinal = self._next_wait()
        if self._recorded(ordinal):
            due = self._waits[ordinal]
            if due is None or time.time() >= due:
                return
            raise Parked(name=None, delay=None, due=due, new=False)
        if seconds <= 0:
            return
        raise Parked(name=None, delay=seconds)

    def _next_wait(self) -> int:
        ordinal = self.waited
        self.waited += 1
        return ordinal

    def _recorded(self, ordinal: int) -> bool:
        return ordinal < len(self._waits)

    def _taken(self, ordinal: int, name: str) -> tuple[str, Any] | None:
        taken = self._signals.get(ordinal)
        if taken is not None and taken[0] != name:
            raise NonDeterminismError(
                f"non-determinism: wait {ordinal} of this step took signal {taken[0]!r} when "
                f"recorded, now waits for {name!r}; the code changed since it ran",
                workflow_id=self.info.workflow_id,
                step_id=self.info.step_id,
                agent=self.info.agent,
            )
        return taken

    def say(self, text: str) -> None:
        """Append an agent message to the session transcript (committed with the step)."""
        self.messages.append(text)

    async def tool(self, name: str, /, **args: Any) -> Any:
        """Call a registered tool through the ledger; a recorded success is returned as is."""
        spec = self._services.app.tools.get(name)
        if spec is None or (self._allowed and name not in self._allowed):
            raise ToolError(
                f"agent {self.info.agent!r} may not use tool {name!r}",
                tool=name,
                non_retryable=True,
            )
        run = self._ledger.next_run(name, args)
        with tracing.child(
            self._services.tracer, f"tool {name}", {"tool.idempotency_key": run.key}
        ):
            return await self._ledger.call(spec, run)

    @property
    def tool_runs(self) -> list[ToolRun]:
        """Finished idempotent calls of this execution, committed with the step."""
        return self._ledger.buffered

    @property
    def tool_replays(self) -> list[ToolRun]:
        """Recorded successes this execution returned instead of calling the tool again."""
        return self._ledger.replayed


class StepModel:
    """``ctx.model``: the runtime's model behind the tenant's rate limit, with the step's
    token usage recorded, and tool calls the model chooses routed through the ledger."""

    def __init__(self, ctx: StepContext) -> None:
        self._ctx = ctx
        self.name = ctx._services.model.name

    async def parse(self, request: ModelRequest, output: type[T]) -> T:
        """Ask for a structured answer of type ``output``."""
        return await self._complete(request, output)

    async def parse_with_tools(
        self, request: ModelRequest, output: type[T], tools: Sequence[str], *, max_turns: int = 6
    ) -> T:
        """Let the model call ``tools`` (each call recorded under its idempotency key)."""
        app_tools = self._ctx._services.app.tools
        unknown = [t for t in tools if t not in app_tools]
        if unknown:
            raise ToolError(f"unknown tool(s) {unknown}", tool=unknown[0], non_retryable=True)
        offered = set(tools)

        async def run_tool(name: str, args: dict[str, Any]) -> Any:
            if name not in offered:
                raise ToolError(f"model chose tool {name!r}, which was not offered", tool=name)
            return await self._ctx.tool(name, **args)

        defs = [app_tools[name].definition() for name in tools]
        return await self._complete(request, output, defs, run_tool, max_turns)

    async def _complete(
        self,
        request: ModelRequest,
        output: type[T],
        tools: Sequence[ToolDef] = (),
        run_tool: ToolRunner | None = None,
        max_turns: int = 6,
    ) -> T:
        runtime, ctx = self._ctx._services, self._ctx
        if ctx.budget is not None:
            ctx.budget.check(ctx.usage)  # before the rate limit: a spent budget never waits
        if runtime.model_limiter is not None:
            await runtime.model_limiter.take(ctx.info.tenant_id)
        # A span per call (the tool calls the model makes are its children).
        with tracing.child(
            runtime.tracer,
            f"model {request.purpose}",
            {"gen_ai.request.model": self.name, "model.purpose": request.purpose},
        ) as span:
            completion = await runtime.model.complete(request, output, tools, run_tool, max_turns)
            used = completion.usage
            span.set_attribute("gen_ai.usage.input_tokens", used.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", used.completion_tokens)
        ctx.usage = ctx.usage + completion.usage
        ctx.model_calls += 1
        runtime.metrics.record_model_call(
            ctx.info.tenant_id,
            self.name,
            used.prompt_tokens,
            used.completion_tokens,
            float(runtime.pricing.cost(self.name, used)),
        )
        return completion.value


def current() -> StepContext:
    """The context of the step running in this task; raises outside a step."""
    try:
        return _current.get()
    except LookupError:
        raise OrchestratorError("not inside a running step") from None


def bind(ctx: StepContext) -> Any:
    """Make ``ctx`` the current step's context (``current()``); returns the token to reset it."""
    return _current.set(ctx)


def _seconds(value: timedelta | float | None) -> float | None:
    return value.total_seconds() if isinstance(value, timedelta) else value
