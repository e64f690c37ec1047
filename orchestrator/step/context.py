"""The step context: what a running agent sees, and the idempotent tool ledger.

Read the current context anywhere inside a step with ``current()``, as
Temporal's activity API does; outside a step it fails clearly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from uuid import UUID

import anyio

from orchestrator.errors import (
    FenceRejected,
    InputNeeded,
    NonDeterminismError,
    OrchestratorError,
    ToolError,
    ToolNotApplied,
)
from orchestrator.models.llm import ModelRequest, T, ToolDef, ToolRunner, Usage
from orchestrator.schemas import WorkflowStatus
from orchestrator.store import memory, recovery, tool_runs
from orchestrator.store.tool_runs import ToolRun

if TYPE_CHECKING:
    from orchestrator.app import ToolSpec
    from orchestrator.runtime import Runtime

_current: ContextVar[StepContext] = ContextVar("orchestrator_step_context")
_CHANGED = object()  # the ledger row changed under us: look again
IN_DOUBT_POLL_SECONDS = 0.25
IN_DOUBT_RECORD_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class StepInfo:
    workflow_id: UUID
    step_id: UUID
    seq: int
    agent: str
    attempt: int
    tenant_id: str
    assigned_by: str
    pipeline: str


def idempotency_key(workflow_id: UUID, seq: int, ordinal: int) -> str:
    """The deterministic key of a tool call: (workflow, step, call ordinal)."""
    return f"{workflow_id}:{seq}:{ordinal}"


class StepContext:
    def __init__(
        self,
        runtime: Runtime,
        info: StepInfo,
        state: Mapping[str, Any],
        recorded: Mapping[int, ToolRun],
        allowed_tools: tuple[str, ...],
        replies: Sequence[str] = (),
    ) -> None:
        self.info = info
        self.state = state
        self._runtime = runtime
        self._recorded = recorded
        self._allowed = allowed_tools
        self._ordinal = 0
        self._replies = list(replies)
        self._asked = 0
        self.tool_runs: list[ToolRun] = []  # finished idempotent calls, committed with the step
        self.messages: list[str] = []  # transcript lines, committed with the step
        self.usage = Usage()  # tokens of this step's model calls, recorded with its attempt
        self.model_calls = 0
        self.superseded = False  # set when the fence moved on (this run's writes are refused)

    @property
    def model(self) -> StepModel:
        """The model, behind this tenant's rate limit, recording this step's usage."""
        return StepModel(self)

    async def cancelled(self) -> bool:
        """Whether this run should stop (check it in long steps): its workflow was
        cancelled, or another execution of the step superseded this one."""
        if self.superseded:
            return True
        async with self._runtime.db() as conn:
            status = await recovery.workflow_status(conn, self.info.workflow_id)
        return status is WorkflowStatus.CANCELLED

    def ask(self, question: str) -> str:
        """Ask the customer; returns the reply once there is one.

        Without a reply yet, the step stops here and the workflow waits, durably,
        until ``orchestrator input`` (or ``Client.provide_input``) delivers one;
        then the step runs again from its start, with recorded tool results
        reused, and this call returns the reply.
        """
        index = self._asked
        self._asked += 1
        if index < len(self._replies):
            return self._replies[index]
        raise InputNeeded(question)

    def say(self, text: str) -> None:
        """Append an agent message to the session transcript (committed with the step)."""
        self.messages.append(text)

    async def tool(self, name: str, /, **args: Any) -> Any:
        """Call a registered tool through the ledger; a recorded success is returned as is."""
        spec = self._runtime.app.tools.get(name)
        if spec is None or (self._allowed and name not in self._allowed):
            raise ToolError(
                f"agent {self.info.agent!r} may not use tool {name!r}",
                tool=name,
                non_retryable=True,
            )
        ordinal = self._ordinal
        self._ordinal += 1
        run = ToolRun(
            idempotency_key(self.info.workflow_id, self.info.seq, ordinal),
            ordinal,
            name,
            "started",
            _jsonable(name, args),
        )
        with self._runtime.tracer.start_as_current_span(
            f"tool {name}", attributes={"tool.idempotency_key": run.key}
        ):
            return await self._tool(spec, run)

    async def _tool(self, spec: ToolSpec, run: ToolRun) -> Any:
        name, ordinal = spec.name, run.ordinal
        recorded = self._recorded.get(ordinal)
        if recorded is not None:
            if recorded.tool != name or recorded.args != run.args:
                # The code changed under a recorded history: returning the old result
                # for a different call would be silently wrong, so stop loudly.
                raise NonDeterminismError(
                    f"non-determinism: call {ordinal} of this step was {recorded.tool}"
                    f"({recorded.args}) when recorded, now {name}({run.args}); the code "
                    f"changed since the workflow started (app version {self._runtime.app.version})",
                    workflow_id=self.info.workflow_id,
                    step_id=self.info.step_id,
                    agent=self.info.agent,
                )
            if recorded.status == "succeeded":
                return recorded.result
        if spec.idempotent:
            return await self._call_buffered(spec, run)
        return await self._call_recorded(spec, run)

    async def _call_buffered(self, spec: ToolSpec, run: ToolRun) -> Any:
        try:
            result = _jsonable(spec.name, await self._invoke(spec, run))
            self._runtime.crash.reached("after_tool_effect")
        except Exception as exc:
            self.tool_runs.append(replace(run, status="failed", error=_describe(exc)))
            raise _as_tool_error(spec.name, exc) from exc
        self.tool_runs.append(replace(run, status="succeeded", result=result))
        return result

    async def _call_recorded(self, spec: ToolSpec, run: ToolRun) -> Any:
        """Non-idempotent: a "started" row commits first, so a crash mid-call is in doubt.

        The row belongs to the execution that started it until its deadline (the
        call's timeout): another execution finding it waits for the owner's outcome,
        and only after the deadline settles it (a reconcile check) or stops (in doubt).
        """
        info, timeout = self.info, self._timeout(spec)
        async with self._runtime.db() as conn:
            started = await tool_runs.start(
                conn, info.workflow_id, info.step_id, info.attempt, run, timeout
            )
        if started:  # the call runs without holding a pooled connection
            return await self._call_owned(spec, run)
        while True:
            async with self._runtime.db() as conn:
                seen = await tool_runs.fetch(conn, run.key)
            if seen is None:
                raise self._fenced_out(f"tool call {run.key}")
            if seen.status == "succeeded":
                return seen.result
            if seen.status == "started" and not seen.lapsed:
                await anyio.sleep(IN_DOUBT_POLL_SECONDS)  # its owner may still record it
                continue
            if seen.status == "failed":  # certainly not applied: call again, as its owner
                if await self._take(seen, "started", timeout=timeout):
                    return await self._call_owned(spec, run)
                continue
            settled = await self._settle_in_doubt(spec, run, seen)
            if settled is not _CHANGED:
                return settled

    async def _call_owned(self, spec: ToolSpec, run: ToolRun) -> Any:
        """Make the call this execution owns, and record its outcome (fenced on the row)."""
        try:
            with anyio.fail_after(self._timeout(spec)):
                value = await self._invoke(spec, run)
            result = _jsonable(spec.name, value)
            self._runtime.crash.reached("after_tool_effect")
        except ToolNotApplied as exc:
            await self._finish(replace(run, status="failed", error=_describe(exc)))
            exc.tool = exc.tool or spec.name  # a tool may raise it without naming itself
            raise
        except BaseException as exc:
            # Raised, timed out or cancelled after the request may have left: in doubt.
            with anyio.CancelScope(shield=True), anyio.move_on_after(IN_DOUBT_RECORD_SECONDS):
                await self._finish(replace(run, status="in_doubt", error=_describe(exc)))
            if not isinstance(exc, Exception):
                raise
            raise ToolError(
                f"in doubt: tool {spec.name!r} call {run.key} raised after it may have "
                f"taken effect: {_describe(exc)}",
                tool=spec.name,
            ) from exc
        if not await self._finish(replace(run, status="succeeded", result=result)):
            raise self._fenced_out(f"tool call {run.key}")
        return result

    async def _settle_in_doubt(self, spec: ToolSpec, run: ToolRun, seen: ToolRun) -> Any:
        """A call whose outcome is unknown and whose owner is past its deadline.

        With a reconcile check: its effect is adopted, or, when it finds none, the
        call is made again by this execution. Without one the step fails,
        non-retryable, and is dead-lettered: never a blind re-run.
        """
        if spec.reconcile is None:
            raise ToolError(
                f"in doubt: tool {spec.name!r} call {run.key} started but recorded no result; "
                "not re-run (not idempotent, no reconcile check)",
                tool=spec.name,
                non_retryable=True,
            )
        found = await spec.reconcile(**run.args, idempotency_key=run.key)
        if found is None:
            if await self._take(seen, "started", timeout=self._timeout(spec)):
                return await self._call_owned(spec, run)
            return _CHANGED
        result = _jsonable(spec.name, found)
        if await self._take(seen, "succeeded", result=result):
            return result
        return _CHANGED

    async def _take(self, seen: ToolRun, status: str, **values: Any) -> bool:
        info = self.info
        async with self._runtime.db() as conn:
            return await tool_runs.take(
                conn, seen, step_id=info.step_id, attempt=info.attempt, status=status, **values
            )

    async def _finish(self, run: ToolRun) -> bool:
        async with self._runtime.db() as conn:
            return await tool_runs.finish(conn, run, self.info.attempt)

    def _timeout(self, spec: ToolSpec) -> float:
        return spec.timeout or self._runtime.settings.tool_timeout_seconds

    def _fenced_out(self, what: str) -> FenceRejected:
        return FenceRejected(
            f"{what}: attempt {self.info.attempt} was superseded",
            workflow_id=self.info.workflow_id,
            step_id=self.info.step_id,
            agent=self.info.agent,
        )

    async def _invoke(self, spec: ToolSpec, run: ToolRun) -> Any:
        extra: dict[str, Any] = {}
        if spec.takes_key:
            extra["idempotency_key"] = run.key
        if spec.takes_token:
            extra["fencing_token"] = self.info.attempt
        return await spec.fn(**run.args, **extra)

    async def search_memory(self, kind: str, query: str, *, limit: int = 3) -> list[memory.Memory]:
        """Semantic search over this tenant's memories (the tenant is not the caller's choice)."""
        embedding = await self._runtime.embedder.embed(query)
        async with self._runtime.db() as conn:
            return await memory.search(
                conn, tenant_id=self.info.tenant_id, kind=kind, embedding=embedding, limit=limit
            )


class StepModel:
    """``ctx.model``: the runtime's model behind the tenant's rate limit, with the step's
    token usage recorded, and tool calls the model chooses routed through the ledger."""

    def __init__(self, ctx: StepContext) -> None:
        self._ctx = ctx
        self.name = ctx._runtime.model.name

    async def parse(self, request: ModelRequest, output: type[T]) -> T:
        """Ask for a structured answer of type ``output``."""
        return await self._complete(request, output)

    async def parse_with_tools(
        self, request: ModelRequest, output: type[T], tools: Sequence[str], *, max_turns: int = 6
    ) -> T:
        """Let the model call ``tools`` (each call recorded under its idempotency key)."""
        app_tools = self._ctx._runtime.app.tools
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
        runtime, ctx = self._ctx._runtime, self._ctx
        if runtime.model_limiter is not None:
            await runtime.model_limiter.take(ctx.info.tenant_id)
        completion = await runtime.model.complete(request, output, tools, run_tool, max_turns)
        ctx.usage = ctx.usage + completion.usage
        ctx.model_calls += 1
        return completion.value


def current() -> StepContext:
    """The context of the step running in this task; raises outside a step."""
    try:
        return _current.get()
    except LookupError:
        raise OrchestratorError("not inside a running step") from None


def bind(ctx: StepContext) -> Any:
    return _current.set(ctx)


def _jsonable(tool: str, value: Any) -> Any:
    # Round-trip through JSON so a fresh result and a replayed one look identical.
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as exc:
        raise ToolError(
            f"tool {tool!r} arguments/result are not JSON: {exc}", tool=tool, non_retryable=True
        ) from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _as_tool_error(tool: str, exc: Exception) -> OrchestratorError:
    if isinstance(exc, OrchestratorError):
        return exc
    return ToolError(f"tool {tool!r} failed: {_describe(exc)}", tool=tool)
