"""The step protocol for one stream entry: lease, open check, run, fenced outcome, handoff.

Per step on the happy path: one Redis round trip to take the step's lease (a
lock) and, side by side with it, one Postgres read to check the step is open;
the agent run; ONE Postgres statement that completes the step fenced on its
attempt; and one Redis round trip for the handoff (XADD next, XACK, PUBLISH,
unlock). Concurrent steps share those round trips (``Runtime.pipelined`` and the
store's group commit, ``orchestrator.batching``).

Every execution has its own fence. A first delivery runs under the attempt
recorded at enqueue; a takeover (a redelivered entry, or a lock taken from a
dead worker) first raises the attempt in Postgres, so two executions never
share one. A failure is recorded and retried later or dead-lettered; a
question to a person parks the workflow; a lost fence is acknowledged and
dropped. Only ``ServiceUnavailable`` (the runtime's own Redis/Postgres) is
infrastructure: the entry is retried by this worker with backoff, under a new
fence, without counting as a failure.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import partial
from typing import Any
from uuid import UUID

import anyio
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from pydantic import BaseModel

from orchestrator import logs, tracing
from orchestrator.connections import drop_idle_connections, redis_errors
from orchestrator.coordination import consolidation, status, streams
from orchestrator.coordination.locks import Lock
from orchestrator.engine.retry import backoff
from orchestrator.errors import (
    AgentError,
    FenceRejected,
    InvalidInput,
    Parked,
    ServiceUnavailable,
    StepError,
    StepLimitReached,
    first_leaf,
)
from orchestrator.metrics import StepOutcome
from orchestrator.runtime import Runtime
from orchestrator.schemas import EventType, Signal, TaskEnvelope, WorkflowStatus
from orchestrator.step.budget import StepBudget
from orchestrator.step.context import INPUT_SIGNAL, StepContext
from orchestrator.step.info import StepInfo
from orchestrator.step.run import run_agent
from orchestrator.store import steps

log = logging.getLogger("orchestrator.worker")

# Errors of the infrastructure, not of the step: the runtime's own Redis and
# Postgres calls raise ServiceUnavailable (orchestrator.connections). Anything
# an agent or tool raises, ConnectionError included, is a step failure.
INFRA_ERRORS: tuple[type[BaseException], ...] = (ServiceUnavailable,)


@dataclass(slots=True)
class _Attempt:
    """One entry's execution: its envelope (with its fence) and whether it must take over."""

    envelope: TaskEnvelope
    takeover: bool


@dataclass(slots=True)
class _Running:
    envelope: TaskEnvelope
    entry: streams.Entry
    lock: Lock
    since: float
    ctx: StepContext
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    committing: bool = False  # the outcome is being written: no longer cancellable


@dataclass(frozen=True, slots=True)
class Held:
    """A leased step not running (yet): claiming it, or waiting out an outage. Its lease,
    and its entry (agent, id) to keep fresh."""

    lock: Lock
    agent: str
    entry_id: bytes


class StepRunner:
    """Runs single entries; the Worker feeds it from the streams."""

    def __init__(self, runtime: Runtime, consumer: str) -> None:
        self.rt = runtime
        self.consumer = consumer
        self.running: dict[tuple[UUID, int], _Running] = {}
        self.last: dict[str, TaskEnvelope] = {}  # the latest step taken per agent
        # Leased steps not running (claiming, or waiting out an outage), by their execution's
        # Lock: two executions of one step on this worker never share an entry.
        self.held: dict[Lock, Held] = {}
        self.stopping = anyio.Event()
        self.refresh_liveness: Callable[[], Awaitable[None]] = _nothing

    async def process(self, agent: str, entry: streams.Entry, *, takeover: bool = False) -> None:
        """Run one stream entry through the step protocol; wait out infrastructure outages.

        ``takeover``: the entry was delivered before (reclaimed from a dead or stalled
        worker), so it runs under a new fence.
        """
        rt = self.rt
        try:
            envelope = streams.decode(entry)
            if envelope.agent != agent:
                raise InvalidInput(f"envelope for agent {envelope.agent!r} on {agent!r} stream")
        except InvalidInput as exc:
            await self._poison(agent, entry, str(exc))
            return
        lock = Lock(
            rt.redis,
            rt.keys.step_lock(envelope.workflow_id, envelope.seq),
            int(rt.settings.lease_seconds * 1000),
            owner=self.consumer,
            via=rt.pipelined,
            fence=envelope.attempt,
            taking_over=takeover,
        )
        attempt = _Attempt(envelope, takeover)
        bound = logs.bind_step(envelope)  # every line logged from here names the step
        try:
            await self._process_until_done(attempt, entry, lock)
        finally:
            logs.unbind(bound)

    async def _process_until_done(
        self, attempt: _Attempt, entry: streams.Entry, lock: Lock
    ) -> None:
        """``_process`` the entry, again after each infrastructure outage, until it is done
        (or this worker stops)."""
        envelope, delay, retry = attempt.envelope, 0.1, False
        try:
            while True:
                try:
                    if retry:
                        with redis_errors():
                            await self.refresh_liveness()  # alive again before touching it
                    await self._process(attempt, entry, lock)
                    break
                except INFRA_ERRORS as exc:
                    await drop_idle_connections(self.rt.redis, exc)
                    log.warning(
                        "workflow %s step %s (%s) waits for %s; retrying in %.1fs",
                        envelope.workflow_id,
                        envelope.seq,
                        envelope.agent,
                        exc,
                        delay,
                    )
                # The lease stays held and the entry fresh (heartbeats keep both) while the
                # outage lasts, so the reconciler and other workers leave the step to this
                # one; the retry runs under the same fence, as nobody else can have run it.
                self.held[lock] = Held(lock, envelope.agent, entry.id)
                retry = True
                with anyio.move_on_after(delay):
                    await self.stopping.wait()
                if self.stopping.is_set():
                    break
                delay = min(delay * 2, 5.0)
        finally:
            # Whatever ended it (a defect, a cancellation too): heartbeats must not keep
            # (or take again) a lease nobody works under any more.
            self.held.pop(lock, None)

    async def _process(self, attempt: _Attempt, entry: streams.Entry, lock: Lock) -> None:
        rt = self.rt
        envelope = attempt.envelope
        if attempt.takeover:
            won, read = await self._lease(lock, envelope, entry), None
        else:
            won, read = await self._lease_and_read(envelope, lock, entry)
        if not won:
            # A live worker holds this step's lease. Not acknowledged: if that worker
            # dies, this entry is taken over.
            return
        self.last[envelope.agent] = envelope
        try:
            with tracing.span(
                rt.tracer,
                f"step {envelope.agent}",
                parent=envelope.traceparent,
                **_span_attributes(envelope, self.consumer),
            ) as span:
                opened = await self._claim(attempt, entry, lock, read)
                if opened is None:
                    span.set_attribute("step.outcome", "skipped")
                    return
                envelope = attempt.envelope
                span.set_attribute("step.attempt", envelope.attempt)
                span.set_attribute("tenant.id", opened.tenant_id)
                rt.crash.reached("after_claim")
                rt.metrics.step_attempts.add(1, {"agent": envelope.agent})
                await self._run_step(envelope, entry, lock, opened)
        except INFRA_ERRORS:
            raise  # the lease stays with this worker, which retries (see process)
        except BaseException:
            # Shutdown or a defect: free the lease at once (best effort); the entry stays
            # pending and is taken over.
            await lock.release_quietly()
            raise

    async def _lease(self, lock: Lock, envelope: TaskEnvelope, entry: streams.Entry) -> bool:
        """Take the step's lease (from a dead holder too); whether it is this execution's.
        Heartbeats keep the lease and the entry fresh from the moment it is taken, also
        while the claim reads Postgres: a read slower than the lease (a loaded server) is
        not a pause, and must not let another worker take the step over."""
        with redis_errors():
            won = await lock.take_over(self._is_dead)
        if won:
            self.held[lock] = Held(lock, envelope.agent, entry.id)
        return won

    async def _lease_and_read(
        self, envelope: TaskEnvelope, lock: Lock, entry: streams.Entry
    ) -> tuple[bool, steps.OpenStep | None]:
        """A first delivery: take the lease and read the step at once, side by side (one
        round trip of latency, not two). The read needs no lease: every execution has its
        own attempt, so whatever ran meanwhile under another moved the attempt, and this
        execution's writes are refused by the fence as they would be after a later read.
        A step this process's submit or completion just created is not read at all (its
        read-ahead)."""
        known = self.rt.store.opened_ahead(envelope)
        if known is not None:  # this process's submit or completion just created the step
            return await self._lease(lock, envelope, entry), known
        read: list[steps.OpenStep] = []

        async def open_step() -> None:
            read.append(await self.rt.store.open(envelope))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(open_step)
                won = await self._lease(lock, envelope, entry)  # kept before the read is back
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None  # the outage itself, as if awaited in turn
        return won, read[0]

    async def _claim(
        self,
        attempt: _Attempt,
        entry: streams.Entry,
        lock: Lock,
        read: steps.OpenStep | None = None,
    ) -> steps.OpenStep | None:
        """Take the step under this execution's fence (a new one for a takeover) and read
        what running it needs (``read``: already read, under this fence); None, the entry
        acknowledged, when it is not to run."""
        rt, envelope = self.rt, attempt.envelope
        takeover = attempt.takeover or lock.stolen
        with tracing.child(rt.tracer, "step.claim", {"step.takeover": takeover}) as span:
            if takeover:
                taken = await rt.store.take_over(envelope, self.consumer)
                if taken is None:
                    log.info(
                        "workflow %s step %s (%s): not taking over: closed or not due",
                        envelope.workflow_id,
                        envelope.seq,
                        envelope.agent,
                    )
                    await self._hand_off(self._ending(envelope, entry, lock))
                    return None
                self._took_over(envelope, taken, entry)
                # This execution's fence from now on, retries after an outage included.
                attempt.envelope, attempt.takeover, lock.stolen = taken, False, False
                envelope = taken
                with redis_errors():
                    await lock.refence(taken.attempt)
            # A lock taken from a dead holder moved the fence: what was read is stale.
            opened = read if read is not None and not takeover else await rt.store.open(envelope)
            if not opened.runnable:
                span.set_attribute("step.skipped", opened.reason)
                log.info(
                    "workflow %s step %s (%s): skipping attempt %d: %s",
                    envelope.workflow_id,
                    envelope.seq,
                    envelope.agent,
                    envelope.attempt,
                    opened.reason,
                )
                await self._hand_off(self._ending(envelope, entry, lock))
                return None
        return opened

    def _took_over(self, envelope: TaskEnvelope, taken: TaskEnvelope, entry: streams.Entry) -> None:
        """Log and measure a takeover of ``envelope``'s step as ``taken``'s attempt."""
        logs.bind_step(taken)  # this task's lines name the new attempt
        silent = "" if entry.idle_ms is None else f" after {entry.idle_ms / 1000:.1f}s"
        log.info(
            "workflow %s step %s (%s): taking over as attempt %d: attempt %d went "
            "silent%s (its worker died or stalled)",
            envelope.workflow_id,
            envelope.seq,
            envelope.agent,
            taken.attempt,
            envelope.attempt,
            silent,
        )
        if entry.idle_ms is not None:  # idle since its last execution's heartbeat
            self.rt.metrics.took_over(envelope.agent, "reclaim", entry.idle_ms / 1000)

    async def _is_dead(self, owner: str) -> bool:
        """Whether the worker named ``owner`` stopped refreshing its liveness key."""
        return not (await status.alive(self.rt.redis, self.rt.keys, [owner]))[0]

    async def _poison(self, agent: str, entry: streams.Entry, reason: str) -> None:
        """Record an unreadable entry durably, park it on the dead-letter stream, ack it."""
        log.warning("dead-lettering entry %r of %s: %s", entry.id, agent, reason)
        self.rt.metrics.dead_letters.add(1, {"agent": agent})
        raw = entry.fields.get(streams.FIELD, b"")
        text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        await self.rt.store.poison(agent=agent, reason=reason, envelope=text)
        with redis_errors():
            await streams.dead_letter(self.rt.redis, self.rt.keys, agent, entry, reason)

    async def _run_step(
        self, envelope: TaskEnvelope, entry: streams.Entry, lock: Lock, opened: steps.OpenStep
    ) -> None:
        rt = self.rt
        cls = rt.app.agents[envelope.agent]
        info = StepInfo(
            envelope.workflow_id,
            envelope.step_id,
            envelope.seq,
            envelope.agent,
            envelope.attempt,
            opened.tenant_id,
            envelope.assigned_by,
            envelope.pipeline,
            opened.session_id,
            opened.customer_id,
        )
        ctx = StepContext(
            rt,
            info,
            envelope.payload,
            opened.recorded,
            cls.tools,
            opened.waits,
            opened.signals,
            _budget(rt, opened),
        )
        key = (envelope.step_id, envelope.attempt)
        running = _Running(envelope, entry, lock, anyio.current_time(), ctx)
        self.running[key] = running
        self.held.pop(lock, None)  # heartbeats keep it as a running step now
        try:
            ending, outcome = await self._settle(running, opened)
        finally:
            # Heartbeats covered the run and the commit, so a slow commit kept the lease.
            self.running.pop(key, None)
        rt.metrics.step_ended(envelope.agent, outcome, anyio.current_time() - running.since)
        trace.get_current_span().set_attribute("step.outcome", outcome)
        await self._hand_off(ending)

    async def _settle(
        self, running: _Running, opened: steps.OpenStep
    ) -> tuple[streams.Handoff, StepOutcome]:
        """Run the agent and commit what came of it: the handoff to send, and the outcome."""
        rt, ctx = self.rt, running.ctx
        envelope, entry, lock = running.envelope, running.entry, running.lock
        cls = rt.app.agents[envelope.agent]
        started = datetime.now(UTC)
        try:
            try:
                with running.scope:
                    outcome = await self._execute(cls, ctx, envelope, started, opened)
                if running.scope.cancelled_caught:
                    raise ctx_superseded(envelope)
                running.committing = True
                with tracing.child(rt.tracer, "step.complete"):
                    completed = await rt.store.complete(envelope, outcome, opened, rt.app.joins)
                rt.crash.reached("after_commit")
                ending = self._ending(
                    envelope, entry, lock, next=completed.next, status=completed.status
                )
                extras = self._memory_extras(ctx, completed.status)
                return replace(ending, extras=extras), "completed"
            except Parked as parked:
                # Control flow (a BaseException the agent could not swallow): wait durably.
                running.committing = True
                return await self._park(envelope, entry, lock, ctx, started, parked), "waiting"
            except FenceRejected:
                raise
            except INFRA_ERRORS:
                raise
            except Exception as exc:
                running.committing = True
                ending = await self._fail(envelope, entry, lock, ctx, started, opened, exc)
                return ending, "failed" if ending.retry is None else "retried"
        except FenceRejected as exc:
            # Another execution owns the step now (or it closed): drop this one quietly.
            log.info("%s", exc)
            return self._ending(envelope, entry, lock), "superseded"

    async def _execute(
        self,
        cls: Any,
        ctx: StepContext,
        envelope: TaskEnvelope,
        started: datetime,
        opened: steps.OpenStep,
    ) -> steps.Outcome:
        agent = cls()
        # A run that took the customer's reply rebuilds working memory: only Postgres has it.
        ctx.memory.stale = any(name == INPUT_SIGNAL for name, _ in opened.signals.values())
        output = await run_agent(agent, ctx, envelope.payload)
        changes = agent.state_update(output)
        return steps.Outcome(
            output=output.model_dump(mode="json"),
            state={**envelope.payload, **changes},
            changes=changes,
            next_agents=self._route(agent, envelope, output, opened),
            tool_runs=ctx.tool_runs,
            messages=ctx.messages,
            worker=self.consumer,
            started_at=started,
            usage=_usage(self.rt, ctx),
            traceparent=tracing.traceparent_of(trace.get_current_span()),
            events=(*ctx.memory.record(), *_replay_events(ctx)),
        )

    def _route(
        self, agent: Any, envelope: TaskEnvelope, output: BaseModel, opened: steps.OpenStep
    ) -> tuple[str, ...]:
        app = self.rt.app
        chosen = agent.route(output)
        if chosen is None:
            chosen = app.default_next(envelope.pipeline, envelope.agent)
        unknown = [a for a in chosen if a not in app.agents]
        if unknown:
            raise AgentError(
                f"routes to unknown agent(s): {', '.join(unknown)}", non_retryable=True
            )
        limit = app.step_limit(envelope.pipeline, self.rt.settings.max_steps)
        if chosen and opened.next_seq + len(chosen) > limit:
            # A routing loop ends here, clearly, instead of running forever.
            raise StepLimitReached(
                f"step limit reached: the workflow has run {opened.next_seq} steps and may "
                f"run {limit} (pipeline {envelope.pipeline!r}); routing to "
                f"{', '.join(chosen)} refused",
                workflow_id=envelope.workflow_id,
                step_id=envelope.step_id,
                agent=envelope.agent,
            )
        return tuple(dict.fromkeys(chosen))

    async def _park(
        self,
        envelope: TaskEnvelope,
        entry: streams.Entry,
        lock: Lock,
        ctx: StepContext,
        started: datetime,
        parked: Parked,
    ) -> streams.Handoff:
        """The step waits, durably, for a signal or a time (no worker holds it meanwhile);
        or, when the signal it waits for is already there, runs again at once."""
        with tracing.child(self.rt.tracer, "step.park", {"wait.signal": parked.name or ""}):
            parking = await self.rt.store.park(
                envelope,
                parked,
                ordinal=ctx.waited - 1,
                recorded=ctx.tool_runs,
                worker=self.consumer,
                started_at=started,
                usage=_usage(self.rt, ctx),
            )
        if parking.rerun is not None:
            return self._ending(envelope, entry, lock, next=[parking.rerun])
        return self._ending(envelope, entry, lock, status=WorkflowStatus.WAITING)

    async def _fail(
        self,
        envelope: TaskEnvelope,
        entry: streams.Entry,
        lock: Lock,
        ctx: StepContext,
        started: datetime,
        opened: steps.OpenStep,
        exc: Exception,
    ) -> streams.Handoff:
        """Record the failure; retry later with backoff, or fail and dead-letter.

        The retry budget counts real failures only (``steps.failures``), never
        takeovers, requeues, replies or resumes: those move the fence, not the budget.
        """
        rt = self.rt
        cls = rt.app.agents[envelope.agent]
        max_attempts = cls.max_attempts or rt.settings.max_attempts
        non_retryable = isinstance(exc, StepError) and exc.non_retryable
        hint = exc.retry_after if isinstance(exc, StepError) else None
        failures = opened.failures + 1
        retry_after = (
            None
            if non_retryable or failures >= max_attempts
            # The error's own hint (a rate limit's wait, a Retry-After) is the least wait.
            else max(
                backoff(
                    failures,
                    base=rt.settings.retry_base_seconds,
                    cap=rt.settings.retry_cap_seconds,
                ),
                hint or 0.0,
            )
        )
        error = f"{type(exc).__name__}: {exc}"[:2000]
        step_span = trace.get_current_span()
        step_span.record_exception(exc)
        step_span.set_status(Status(StatusCode.ERROR, error))
        log.warning(
            "workflow %s step %s (%s) failure %d/%d (%s): %s",
            envelope.workflow_id,
            envelope.seq,
            envelope.agent,
            failures,
            max_attempts,
            "giving up" if retry_after is None else f"retry in {retry_after:.2f}s",
            error,
        )
        with tracing.child(rt.tracer, "step.fail", {"step.retry": retry_after is not None}):
            failure = await rt.store.fail(
                envelope,
                error=error,
                retry_after=retry_after,
                recorded=ctx.tool_runs,
                worker=self.consumer,
                started_at=started,
                usage=_usage(rt, ctx),
                optional_join=rt.app.optional_join(envelope.pipeline),
                events=_replay_events(ctx),
            )
        if failure.retry is not None:
            rt.metrics.retries.add(1, {"agent": envelope.agent})
            ending = self._ending(envelope, entry, lock)
            return replace(ending, retry=failure.retry, retry_delay=failure.delay)
        if not failure.workflow_failed:  # a branch ended; its join tolerates the failure
            return self._ending(envelope, entry, lock, next=failure.promoted, status=failure.status)
        # Out of attempts: dead-lettered; the next ticket of its session may start.
        rt.metrics.dead_letters.add(1, {"agent": envelope.agent})
        ending = self._ending(
            envelope, entry, lock, next=failure.promoted, status=WorkflowStatus.FAILED
        )
        return replace(ending, dead_letter=error)

    def _memory_extras(
        self, ctx: StepContext, status: WorkflowStatus | None
    ) -> tuple[Callable[[Any], None], ...]:
        """Redis commands for the handoff's round trip: the session's working memory
        takes this step's messages and tool outputs; a completed workflow whose pipeline
        consolidates goes to the consolidation queue (Postgres keeps it pending until done,
        so losing either is harmless)."""
        extras: list[Callable[[Any], None]] = [
            partial(ctx.memory.append_in, said=ctx.messages, runs=ctx.tool_runs)
        ]
        if status is WorkflowStatus.COMPLETED and self.rt.app.consolidates(ctx.info.pipeline):
            extras.append(
                partial(
                    consolidation.enqueue_in, keys=self.rt.keys, workflow_id=ctx.info.workflow_id
                )
            )
        return tuple(extras)

    def _ending(
        self,
        envelope: TaskEnvelope,
        entry: streams.Entry,
        lock: Lock,
        *,
        next: Sequence[TaskEnvelope] = (),
        status: WorkflowStatus | None = None,
    ) -> streams.Handoff:
        signal = (
            None
            if status is None
            else Signal(workflow_id=envelope.workflow_id, status=status, seq=envelope.seq)
        )
        return streams.Handoff(
            done=envelope, entry_id=entry.id, next=next, signal=signal, lock=lock
        )

    async def _hand_off(self, ending: streams.Handoff) -> None:
        rt = self.rt
        with redis_errors():
            if ending.next and rt.crash.at == "after_xadd":
                # Fault injection only: split the round trip to die between XADD and XACK.
                for envelope_next in ending.next:
                    await streams.enqueue(rt.redis, rt.keys, envelope_next)
                rt.crash.reached("after_xadd")
                ending = replace(ending, next=())
            await rt.pipelined(partial(streams.hand_off_in, keys=rt.keys, h=ending))

    def supersede(self, running: _Running) -> None:
        """Another execution owns the step now: stop this run (its writes would be refused)."""
        if running.committing:
            return
        log.info(
            "workflow %s step %s attempt %d was superseded; stopping it",
            running.envelope.workflow_id,
            running.envelope.seq,
            running.envelope.attempt,
        )
        running.ctx.superseded = True
        running.scope.cancel()


def ctx_superseded(envelope: TaskEnvelope) -> FenceRejected:
    """The error for a run stopped because another execution of its step took over."""
    return FenceRejected(
        f"attempt {envelope.attempt} stopped: superseded while running",
        workflow_id=envelope.workflow_id,
        step_id=envelope.step_id,
        agent=envelope.agent,
    )


def _span_attributes(envelope: TaskEnvelope, worker: str) -> dict[str, Any]:
    """What a step's span says about it (the attempt is set again after a takeover)."""
    return {
        "workflow.id": str(envelope.workflow_id),
        "step.id": str(envelope.step_id),
        "step.seq": envelope.seq,
        "step.agent": envelope.agent,
        "step.attempt": envelope.attempt,
        "worker.id": worker,
    }


def _usage(runtime: Runtime, ctx: StepContext) -> steps.ModelUse:
    name = runtime.model.name
    return steps.ModelUse(
        name,
        ctx.model_calls,
        ctx.usage.prompt_tokens,
        ctx.usage.completion_tokens,
        runtime.pricing.cost(name, ctx.usage),
    )


def _budget(runtime: Runtime, opened: steps.OpenStep) -> StepBudget | None:
    """The tenant's budget as the open read found it (None: the tenant has none)."""
    if opened.budget_usd is None:
        return None
    return StepBudget(
        opened.tenant_id,
        opened.budget_usd,
        opened.budget_spent_usd,
        partial(runtime.pricing.cost, runtime.model.name),
    )


def _replay_events(ctx: StepContext) -> tuple[tuple[str, dict[str, Any]], ...]:
    """One ``tool.replayed`` event per recorded result this execution returned (committed
    with its outcome, so ``orchestrator show`` can tell a replay from a call)."""
    return tuple(
        (
            EventType.TOOL_REPLAYED,
            {
                "key": run.key,
                "tool": run.tool,
                "ordinal": run.ordinal,
                "attempt": ctx.info.attempt,
                "recorded_attempt": run.attempt,
            },
        )
        for run in ctx.tool_replays
    )


async def _nothing() -> None:
    return None
