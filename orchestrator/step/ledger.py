"""The tool ledger: every tool call of a step, keyed and recorded so it takes effect once.

A call's key is (workflow, step seq, call ordinal). A recorded success is returned
as is. Idempotent tools run and their results commit with the step; a
non-idempotent call commits a "started" row first, owned by the execution that
made it until its deadline, so a crash mid-call leaves it in doubt: never re-run
blindly, settled by the tool's reconcile check or dead-lettered.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from uuid import UUID

import anyio

from orchestrator.errors import (
    FenceRejected,
    NonDeterminismError,
    OrchestratorError,
    ToolError,
    ToolNotApplied,
)
from orchestrator.step.info import StepInfo
from orchestrator.step.services import StepServices
from orchestrator.step.tools import ToolSpec
from orchestrator.store.tool_runs import ToolRun

_CHANGED = object()  # the ledger row changed under us: look again
IN_DOUBT_POLL_SECONDS = 0.25
IN_DOUBT_RECORD_SECONDS = 5.0


def idempotency_key(workflow_id: UUID, seq: int, ordinal: int) -> str:
    """The deterministic key of a tool call: (workflow, step, call ordinal)."""
    return f"{workflow_id}:{seq}:{ordinal}"


class ToolLedger:
    """One step execution's tool calls, checked against what earlier executions recorded."""

    def __init__(
        self, services: StepServices, info: StepInfo, recorded: Mapping[int, ToolRun]
    ) -> None:
        self._services = services
        self.info = info
        self._recorded = recorded
        self._ordinal = 0
        self.buffered: list[ToolRun] = []  # finished idempotent calls, committed with the step
        # Recorded successes returned instead of calling (a re-run): the step's record says so.
        self.replayed: list[ToolRun] = []

    def next_run(self, name: str, args: dict[str, Any]) -> ToolRun:
        """The next call of this step, under its idempotency key."""
        ordinal = self._ordinal
        self._ordinal += 1
        return ToolRun(
            idempotency_key(self.info.workflow_id, self.info.seq, ordinal),
            ordinal,
            name,
            "started",
            _jsonable(name, args),
        )

    async def call(self, spec: ToolSpec, run: ToolRun) -> Any:
        """Make ``run`` through the ledger: a recorded success is returned, a recorded
        different call raises NonDeterminismError."""
        name, ordinal = spec.name, run.ordinal
        recorded = self._recorded.get(ordinal)
        if recorded is not None:
            if recorded.tool != name or recorded.args != run.args:
                # The code changed under a recorded history: returning the old result
                # for a different call would be silently wrong, so stop loudly.
                raise NonDeterminismError(
                    f"non-determinism: call {ordinal} of this step was {recorded.tool}"
                    f"({recorded.args}) when recorded, now {name}({run.args}); the code "
                    "changed since the workflow started "
                    f"(app version {self._services.app.version})",
                    workflow_id=self.info.workflow_id,
                    step_id=self.info.step_id,
                    agent=self.info.agent,
                )
            if recorded.status == "succeeded":
                self._services.metrics.tool_call(name, replayed=True)
                self.replayed.append(recorded)
                return recorded.result
        if spec.idempotent:
            return await self._call_buffered(spec, run)
        return await self._call_recorded(spec, run)

    async def _call_buffered(self, spec: ToolSpec, run: ToolRun) -> Any:
        try:
            result = _jsonable(spec.name, await self._invoke(spec, run))
            self._services.crash.reached("after_tool_effect")
        except Exception as exc:
            self.buffered.append(replace(run, status="failed", error=_describe(exc)))
            raise _as_tool_error(spec.name, exc) from exc
        self.buffered.append(replace(run, status="succeeded", result=result))
        return result

    async def _call_recorded(self, spec: ToolSpec, run: ToolRun) -> Any:
        """Non-idempotent: a "started" row commits first, so a crash mid-call is in doubt.

        The row belongs to the execution that started it until its deadline (the
        call's timeout): another execution finding it waits for the owner's outcome,
        and only after the deadline settles it (a reconcile check) or stops (in doubt).
        """
        info, timeout = self.info, self._timeout(spec)
        started = await self._services.store.start_tool_run(
            info.workflow_id, info.step_id, info.attempt, run, timeout
        )
        if started:  # the call runs without holding a pooled connection
            return await self._call_owned(spec, run)
        while True:
            seen = await self._services.store.tool_run(run.key)
            if seen is None:
                raise self._fenced_out(f"tool call {run.key}")
            if seen.status == "succeeded":  # another execution of the step finished it
                self._services.metrics.tool_call(spec.name, replayed=True)
                self.replayed.append(seen)
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
            self._services.crash.reached("after_tool_effect")
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
            self._services.metrics.tool_call(spec.name, replayed=True)  # adopted, not called
            return result
        return _CHANGED

    async def _take(self, seen: ToolRun, status: str, **values: Any) -> bool:
        info = self.info
        return await self._services.store.take_tool_run(
            seen, step_id=info.step_id, attempt=info.attempt, status=status, **values
        )

    async def _finish(self, run: ToolRun) -> bool:
        return await self._services.store.finish_tool_run(run, self.info.attempt)

    def _timeout(self, spec: ToolSpec) -> float:
        return spec.timeout or self._services.settings.tool_timeout_seconds

    def _fenced_out(self, what: str) -> FenceRejected:
        return FenceRejected(
            f"{what}: attempt {self.info.attempt} was superseded",
            workflow_id=self.info.workflow_id,
            step_id=self.info.step_id,
            agent=self.info.agent,
        )

    async def _invoke(self, spec: ToolSpec, run: ToolRun) -> Any:
        self._services.metrics.tool_call(spec.name, replayed=False)
        extra: dict[str, Any] = {}
        if spec.takes_key:
            extra["idempotency_key"] = run.key
        if spec.takes_token:
            extra["fencing_token"] = self.info.attempt
        return await spec.fn(**run.args, **extra)


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
