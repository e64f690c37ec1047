"""The promise, break by break: each test drives the exact interleaving of one issue.

Real Redis and Postgres; a Worker is driven entry by entry (``streams.read`` +
``process``), and concurrent parties (a reconciler pass, a requeue, a cancel, a
heartbeat) are placed at the exact point the break needs. Sleeps only pass a
configured lease, idle time or retry backoff.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any
from uuid import UUID, uuid4

import anyio
import asyncpg
import pytest
import redis.exceptions

from orchestrator.client import Client
from orchestrator.connections import OUTAGE
from orchestrator.coordination import delayed, streams
from orchestrator.engine.reconciler import PassReport, Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.errors import (
    ConfigurationError,
    FenceRejected,
    ServiceUnavailable,
    ToolNotApplied,
)
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.context import StepContext
from orchestrator.step.info import StepInfo
from orchestrator.step.ledger import idempotency_key
from orchestrator.store import recovery, tool_runs, workflows
from orchestrator.store.tool_runs import ToolRun
from tests.apps import TICKET, Probe, build_promise_app
from tests.conftest import fetch, owner_connection, runtime_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_promise_app(probe)) as runtime:
        yield runtime


async def _read(rt: Runtime, agent: str, consumer: str) -> streams.Entry:
    """Deliver the next new entry of ``agent`` to ``consumer``."""
    await streams.ensure_group(rt.redis, rt.keys, agent)
    entries = await streams.read(rt.redis, rt.keys, agent, consumer, count=1, block_ms=2000)
    assert len(entries) == 1
    return entries[0]


async def _next(rt: Runtime, agent: str, consumer: str) -> streams.Entry:
    """Like ``_read``, after a scheduled retry came due (backoff is 10-20 ms here)."""
    await anyio.sleep(0.05)
    await delayed.move_due(rt.redis, rt.keys)
    return await _read(rt, agent, consumer)


async def _step(rt: Runtime, workflow_id: UUID) -> asyncpg.Record:
    [row] = await fetch(
        rt,
        "SELECT id, status, attempt, failures, not_before FROM steps WHERE workflow_id = $1",
        workflow_id,
    )
    return row


async def _attempts(rt: Runtime, workflow_id: UUID) -> list[tuple[int, str]]:
    rows = await fetch(
        rt,
        """SELECT a.attempt, a.outcome FROM step_attempts a JOIN steps s ON s.id = a.step_id
           WHERE s.workflow_id = $1 ORDER BY a.attempt""",
        workflow_id,
    )
    return [(r["attempt"], r["outcome"]) for r in rows]


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


# 1. Backlog ------------------------------------------------------------------------------


async def test_backlog_running_step_delivered_late_is_not_taken_for_stalled(
    settings: Settings, probe: Probe
) -> None:
    fast = settings.model_copy(update={"stall_seconds": 0.2})
    async with runtime_for(fast, build_promise_app(probe)) as rt:
        client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
        late = await client.submit("gated", TICKET)
        entry = await _read(rt, "gated", worker.consumer)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.process, "gated", entry)
                await probe.entered.wait()  # running, its step lock held
                # It waited in a backlog far longer than the stall time before delivery:
                # Postgres shows no progress on it for an hour.
                async with rt.db() as conn:
                    await conn.execute(
                        "UPDATE steps SET updated_at = now() - interval '1 hour'"
                        " WHERE workflow_id = $1",
                        late,
                    )
                # And one waits, undelivered, behind it in the stream.
                waiting = await client.submit("gated", TICKET)
                await anyio.sleep(fast.stall_after + 0.05)
                async with rt.db() as conn:
                    stalled = await recovery.stalled(conn, older_than=fast.stall_after)
                seen = {s.step_id for s in stalled}
                assert seen == {(await _step(rt, w))["id"] for w in (late, waiting)}  # both

                report = await Reconciler(rt).pass_once()
                assert report.requeued == 0
                assert await rt.redis.xlen(rt.keys.stream("gated")) == 2  # nothing re-enqueued
                assert (await _step(rt, late))["attempt"] == 1  # the running one kept its fence
                probe.gate.set()

        assert (await client.get(late)).status is WorkflowStatus.COMPLETED
        assert await _attempts(rt, late) == [(1, "completed")]
        step = await _step(rt, waiting)
        assert (step["status"], step["attempt"]) == ("queued", 1)


# 2. Reconciler errors --------------------------------------------------------------------


class _Observed(Reconciler):
    """Records what each pass ended with; the handling under test (run, _lead) is unchanged."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.outcomes: list[PassReport | Exception] = []

    async def pass_once(self) -> PassReport:
        try:
            report = await super().pass_once()
        except Exception as exc:
            self.outcomes.append(exc)
            raise
        self.outcomes.append(report)
        return report

    def healthy_after_error(self) -> bool:
        errors = [i for i, o in enumerate(self.outcomes) if isinstance(o, Exception)]
        return bool(errors) and any(
            isinstance(o, PassReport) for o in self.outcomes[errors[0] + 1 :]
        )


async def test_reconciler_errors_a_postgres_error_in_a_pass_does_not_end_run(
    settings: Settings, probe: Probe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="orchestrator.reconciler")
    fast = settings.model_copy(update={"reconcile_interval_seconds": 0.05})
    async with runtime_for(fast, build_promise_app(probe)) as rt:
        reconciler, stop, ended = _Observed(rt), anyio.Event(), anyio.Event()

        async def run() -> None:
            try:
                await reconciler.run(stop)
            finally:
                ended.set()

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                async with owner_connection(rt) as blocker:
                    tx = blocker.transaction()
                    await tx.start()
                    # The pass's first statement on steps will wait behind this lock ...
                    await blocker.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
                    tg.start_soon(run)
                    # ... and its connection is killed under it, mid-statement.
                    await _kill_when_waiting(blocker, "steps")
                    await _until(lambda: bool(reconciler.outcomes))
                    await tx.commit()
                await _until(reconciler.healthy_after_error)
                assert not ended.is_set()  # run() is still going
                stop.set()

    error = next(o for o in reconciler.outcomes if isinstance(o, Exception))
    assert isinstance(error, OUTAGE), error  # an outage: logged and waited out
    warnings = [r.getMessage() for r in caplog.records if r.name == "orchestrator.reconciler"]
    assert any(m.startswith("reconciler: ") and "retrying" in m for m in warnings), warnings
    assert "reconciler: back to normal" in warnings


async def _kill_when_waiting(blocker: Any, table: str) -> None:
    """Terminate the backend waiting for ``blocker``'s lock on ``table`` (mid-statement)."""
    pid = None
    while pid is None:
        pid = await blocker.fetchval(
            "SELECT pid FROM pg_locks WHERE relation = $1::regclass AND NOT granted", table
        )
        if pid is None:
            await anyio.sleep(0.01)
    assert await blocker.fetchval("SELECT pg_terminate_backend($1)", pid)


async def test_reconciler_errors_pass_on_a_killed_connection_raises_service_unavailable(
    rt: Runtime,
) -> None:
    """A runtime statement whose connection is killed (a Postgres restart, a reset) is an
    outage: ``rt.db()`` raises ServiceUnavailable, which is what the worker waits out."""
    caught: list[BaseException] = []

    async def one_pass() -> None:
        try:
            await Reconciler(rt).pass_once()
        except BaseException as exc:
            caught.append(exc)

    with anyio.fail_after(10):
        async with owner_connection(rt) as blocker:
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one_pass)
                    await _kill_when_waiting(blocker, "steps")
    [error] = caught
    assert isinstance(error, ServiceUnavailable), (
        f"{type(error).__name__}: {error} (while handling "
        f"{type(error.__context__).__name__}: {error.__context__})"
    )


async def test_outage_killed_connection_at_completion_is_not_a_step_failure(
    rt: Runtime, probe: Probe
) -> None:
    """Postgres drops the completing statement's connection: the step is retried by the
    worker under a new fence, not recorded as a failure of the agent (budget untouched)."""
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("gated", TICKET)
    entry = await _read(rt, "gated", worker.consumer)
    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.process, "gated", entry)
            await probe.entered.wait()
            async with owner_connection(rt) as blocker:
                async with blocker.transaction():
                    await blocker.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
                    probe.gate.set()  # the agent returns; its completion waits for the lock
                    await _kill_when_waiting(blocker, "steps")
    failed = await fetch(rt, "SELECT attempt, error FROM step_attempts WHERE outcome = 'failed'")
    assert failed == [], [dict(f) for f in failed]
    assert (await _step(rt, wid))["failures"] == 0
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED


# 3. Tool ledger ----------------------------------------------------------------------------


async def test_tool_ledger_superseded_execution_cannot_start_a_non_idempotent_call(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    wid = await client.submit("refunder", TICKET)
    step_id = (await client.get(wid)).steps[0].id
    run = ToolRun(idempotency_key(wid, 0, 0), 0, "charge", "started", {"amount": 7})
    async with rt.db() as conn:
        newer = await recovery.requeue(conn, step_id)  # attempt 2 owns the step now
        assert newer is not None and newer.attempt == 2
        assert not await tool_runs.start(conn, wid, step_id, 1, run, 30.0)
        assert await tool_runs.fetch(conn, run.key) is None

    info = StepInfo(wid, step_id, 0, "refunder", 1, TICKET.tenant_id, "submit", "refunder")
    ctx = StepContext(rt, info, {}, {}, ("charge", "refund"))
    with pytest.raises(FenceRejected):
        await ctx.tool("charge", amount=7)
    assert probe.calls["charge"] == 0  # the tool function never ran
    assert await fetch(rt, "SELECT idempotency_key FROM tool_runs") == []

    async with rt.db() as conn:  # the current execution may start it
        assert await tool_runs.start(conn, wid, step_id, 2, run, 30.0)


async def test_tool_ledger_late_result_never_overwrites_a_settled_row(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    wid = await client.submit("refunder", TICKET)
    step_id = (await client.get(wid)).steps[0].id
    charge = ToolRun(idempotency_key(wid, 0, 0), 0, "charge", "started", {"amount": 7})
    refund = ToolRun(idempotency_key(wid, 0, 1), 1, "refund", "started", {"amount": 7})
    async with rt.db() as conn:
        # Attempt 1 starts both calls (deadline 0: past at once), then stalls.
        assert await tool_runs.start(conn, wid, step_id, 1, charge, 0.0)
        assert await tool_runs.start(conn, wid, step_id, 1, refund, 0.0)
        assert await recovery.requeue(conn, step_id) is not None  # attempt 2 takes over
        seen_charge = await tool_runs.fetch(conn, charge.key)
        seen_refund = await tool_runs.fetch(conn, refund.key)
        assert seen_charge is not None and seen_refund is not None and seen_charge.lapsed
        # Attempt 2 settles one row (a reconcile check found the effect), calls the other again.
        mine = {"charged": 7, "by": "attempt 2"}
        assert await tool_runs.take(
            conn, seen_charge, step_id=step_id, attempt=2, status="succeeded", result=mine
        )
        assert await tool_runs.take(
            conn, seen_refund, step_id=step_id, attempt=2, status="started", timeout=30.0
        )

        # Attempt 1 wakes up with its late outcomes: refused, row by row.
        late = replace(charge, status="succeeded", result={"charged": 7, "by": "attempt 1"})
        assert not await tool_runs.finish(conn, late, 1)
        assert not await tool_runs.finish(conn, replace(charge, status="in_doubt", error="x"), 1)
        assert not await tool_runs.finish(conn, replace(refund, status="succeeded", result={}), 1)
        settled = await tool_runs.fetch(conn, charge.key)
        retried = await tool_runs.fetch(conn, refund.key)
    assert settled is not None and retried is not None
    assert (settled.status, settled.attempt, settled.result) == ("succeeded", 2, mine)
    assert (retried.status, retried.attempt, retried.result) == ("started", 2, None)


async def test_tool_ledger_exception_from_non_idempotent_tool_is_in_doubt_never_rerun(
    rt: Runtime, probe: Probe
) -> None:
    probe.wire_errors = [RuntimeError("connection reset after the request was sent")]
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("wirer", TICKET)
    await worker.process("wirer", await _read(rt, "wirer", worker.consumer))
    [run] = await fetch(rt, "SELECT status, attempt, error FROM tool_runs")
    assert (run["status"], run["attempt"]) == ("in_doubt", 1)
    assert "RuntimeError: connection reset" in run["error"]
    step = await _step(rt, wid)
    assert (step["status"], step["failures"]) == ("queued", 1)  # a retry was scheduled

    await worker.process("wirer", await _next(rt, "wirer", worker.consumer))
    record = await client.get(wid)
    assert record.status is WorkflowStatus.FAILED
    assert probe.calls["wire"] == 1  # the retry did not call it again
    [letter] = await client.dead_letters()
    assert "in doubt" in letter.reason and "not re-run" in letter.reason
    assert await _attempts(rt, wid) == [(1, "failed"), (2, "failed")]


async def test_tool_ledger_tool_not_applied_is_failed_and_called_again(
    rt: Runtime, probe: Probe
) -> None:
    probe.wire_errors = [ToolNotApplied("the bank refused: daily limit reached")]
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("wirer", TICKET)
    await worker.process("wirer", await _read(rt, "wirer", worker.consumer))
    [run] = await fetch(rt, "SELECT status, attempt, error FROM tool_runs")
    assert (run["status"], run["attempt"]) == ("failed", 1)
    assert "daily limit" in run["error"]
    assert (await client.get(wid)).status is WorkflowStatus.RUNNING

    await worker.process("wirer", await _next(rt, "wirer", worker.consumer))
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    assert record.steps[0].output == {"value": "wired 9"}
    assert probe.calls["wire"] == 2  # certainly not applied: called again
    [run] = await fetch(rt, "SELECT status, attempt, result FROM tool_runs")
    assert (run["status"], run["attempt"], run["result"]) == ("succeeded", 2, {"wired": 9})


async def test_tool_ledger_takeover_runs_under_a_new_attempt(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("gated", TICKET)
    entry = await _read(rt, "gated", worker.consumer)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: worker.process("gated", entry, takeover=True))
            await probe.entered.wait()
            # Bumped in Postgres before the agent ran, and the run carries it.
            assert (await _step(rt, wid))["attempt"] == 2
            assert [r.envelope.attempt for r in worker.runner.running.values()] == [2]
            probe.gate.set()
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    assert await _attempts(rt, wid) == [(2, "completed")]


async def test_tool_ledger_lock_of_a_dead_worker_is_taken_under_a_new_attempt(
    rt: Runtime, probe: Probe
) -> None:
    """A paused worker (liveness lapsed) still runs attempt 1 when another takes the step:
    the taker runs attempt 2, so the two never share a fence; a live holder is left alone."""
    client = Client(rt)
    paused = Worker(rt, concurrency=1, reconcile=False)
    taker = Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("gated", TICKET)
    entry = await _read(rt, "gated", paused.consumer)
    alive_key = rt.keys.worker_alive(paused.consumer)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await rt.redis.set(alive_key, "1", px=60_000)
            tg.start_soon(paused.process, "gated", entry)
            await probe.entered.wait()  # attempt 1 runs, holding the step lock
            assert [r.envelope.attempt for r in paused.runner.running.values()] == [1]

            await taker.process("gated", entry)  # the holder is alive: not taken
            assert taker.runner.running == {}
            assert (await _step(rt, wid))["attempt"] == 1
            holder: Any = await rt.redis.get(rt.keys.step_lock(wid, 0))
            assert holder is not None and holder.startswith(paused.consumer.encode() + b"|")

            await rt.redis.delete(alive_key)  # the holder stops proving it is alive
            tg.start_soon(taker.process, "gated", entry)
            await _until(lambda: bool(taker.runner.running))
            assert [r.envelope.attempt for r in taker.runner.running.values()] == [2]
            assert (await _step(rt, wid))["attempt"] == 2
            holder = await rt.redis.get(rt.keys.step_lock(wid, 0))
            assert holder is not None and holder.startswith(taker.consumer.encode() + b"|")
            probe.gate.set()  # both finish: only attempt 2 may complete
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    assert await _attempts(rt, wid) == [(2, "completed")]


async def test_tool_ledger_fencing_token_is_the_executions_attempt(
    rt: Runtime, probe: Probe
) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    first = await client.submit("fencer", TICKET)
    await worker.process("fencer", await _read(rt, "fencer", worker.consumer))
    second = await client.submit("fencer", TICKET)
    await worker.process("fencer", await _read(rt, "fencer", worker.consumer), takeover=True)
    assert probe.tokens == [1, 2]
    assert (await client.get(first)).steps[0].output == {"value": "token 1"}
    assert (await client.get(second)).steps[0].output == {"value": "token 2"}


# 4. An agent's ConnectionError -------------------------------------------------------------


async def test_agent_connection_error_is_a_step_failure(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("disconnected", TICKET)
    entry = await _read(rt, "disconnected", worker.consumer)
    with anyio.fail_after(10):  # not waited out as if it were our own Postgres or Redis
        await worker.process("disconnected", entry)
    assert probe.calls["disconnected"] == 1
    [attempt] = await fetch(rt, "SELECT attempt, outcome, error FROM step_attempts")
    assert (attempt["attempt"], attempt["outcome"]) == (1, "failed")
    assert attempt["error"].startswith("ConnectionError: the agent's own API refused")
    step = await _step(rt, wid)
    assert (step["status"], step["attempt"], step["failures"]) == ("queued", 2, 1)
    assert step["not_before"] is not None
    assert await rt.redis.zcard(rt.keys.delayed()) == 1  # the retry is scheduled
    assert (await rt.redis.xpending(rt.keys.stream("disconnected"), "disconnected"))["pending"] == 0


# 5. Fence and budget apart -------------------------------------------------------------------


async def test_fence_and_budget_apart_requeues_do_not_spend_retries(
    rt: Runtime, probe: Probe
) -> None:
    assert rt.settings.max_attempts == 3
    probe.failures_left = 1
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("flaky", TICKET)
    stale = await _read(rt, "flaky", worker.consumer)
    step_id = (await client.get(wid)).steps[0].id
    async with rt.db() as conn:  # two reconciler requeues: attempt 3, no failure yet
        assert await recovery.requeue(conn, step_id, reason="stalled") is not None
        newest = await recovery.requeue(conn, step_id, reason="stalled")
    assert newest is not None and newest.attempt == 3
    # Attempt 1's entry, fenced out. Taken a moment after its submit, it runs on its
    # read-ahead (store.read_ahead): the idempotent lookup runs, the charge is refused by
    # the ledger's fence, nothing is written, no retry is spent.
    await worker.process("flaky", stale)
    assert (probe.calls["lookup"], probe.calls["charge"]) == (1, 0)
    step = await _step(rt, wid)
    assert (step["attempt"], step["failures"]) == (3, 0)

    await streams.enqueue(rt.redis, rt.keys, newest)
    await worker.process("flaky", await _read(rt, "flaky", worker.consumer))  # fails once
    assert (await client.get(wid)).status is WorkflowStatus.RUNNING
    step = await _step(rt, wid)
    assert (step["attempt"], step["failures"]) == (4, 1)

    await worker.process("flaky", await _next(rt, "flaky", worker.consumer))
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    assert await _attempts(rt, wid) == [(3, "failed"), (4, "completed")]


async def test_fence_and_budget_apart_resume_restores_the_full_budget(
    rt: Runtime, probe: Probe
) -> None:
    probe.failures_left = 99
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    wid = await client.submit("flaky", TICKET)
    for _ in range(rt.settings.max_attempts):
        await worker.process("flaky", await _next(rt, "flaky", worker.consumer))
    assert (await client.get(wid)).status is WorkflowStatus.FAILED
    assert (await _step(rt, wid))["failures"] == 3

    assert await client.resume(wid) == 1
    step = await _step(rt, wid)
    assert (step["status"], step["attempt"], step["failures"]) == ("queued", 4, 0)
    await worker.process("flaky", await _next(rt, "flaky", worker.consumer))  # fails again
    assert (await client.get(wid)).status is WorkflowStatus.RUNNING  # retried, not failed
    assert (await _step(rt, wid))["failures"] == 1

    probe.failures_left = 0
    await worker.process("flaky", await _next(rt, "flaky", worker.consumer))
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED


# 6. Timeouts ---------------------------------------------------------------------------------


async def test_timeouts_from_settings_reach_the_clients(settings: Settings, probe: Probe) -> None:
    tight = settings.model_copy(update={"pg_timeout_seconds": 0.5, "redis_timeout_seconds": 0.3})
    async with runtime_for(tight, build_promise_app(probe)) as rt:
        kwargs = rt.redis.connection_pool.connection_kwargs
        assert kwargs["socket_connect_timeout"] == pytest.approx(0.3)
        assert kwargs["socket_timeout"] == pytest.approx(0.3 + tight.block_ms / 1000)
        with pytest.raises(redis.exceptions.TimeoutError):
            # A reply slower than the socket timeout (a black hole looks the same).
            await rt.redis.blpop([f"{rt.keys.prefix}:test:never"], timeout=3)

        with pytest.raises(ServiceUnavailable, match="Postgres unavailable: TimeoutError"):
            async with rt.db() as conn:
                await conn.execute("SELECT pg_sleep(3)")
        async with rt.db() as conn:  # the pool is fine afterwards
            assert await conn.fetchval("SELECT 1") == 1


# 7. A fenced-out run is told ---------------------------------------------------------------


async def test_fenced_out_run_is_told_and_stopped(settings: Settings, probe: Probe) -> None:
    fast = settings.model_copy(update={"lease_seconds": 0.3})
    async with runtime_for(fast, build_promise_app(probe)) as rt:
        client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
        wid = await client.submit("gated", TICKET)
        entry = await _read(rt, "gated", worker.consumer)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.process, "gated", entry)  # ends only if it is stopped
                await probe.entered.wait()
                [running] = worker.runner.running.values()
                async with rt.db() as conn:
                    assert await recovery.requeue(conn, running.envelope.step_id) is not None
                # Running for a third of the lease: the heartbeat asks Postgres for its fence.
                await anyio.sleep(fast.lease_seconds / 3 + 0.02)
                await worker._heartbeat()
                assert running.ctx is not None and running.ctx.superseded
                assert await running.ctx.cancelled()
        assert not probe.gate.is_set() and probe.cancel_seen is None  # stopped inside run()
        assert worker.runner.running == {}
        assert await rt.redis.get(rt.keys.step_lock(wid, 0)) is None  # its lease is released
        assert (await rt.redis.xpending(rt.keys.stream("gated"), "gated"))["pending"] == 0
        # Nothing of it was committed.
        assert await _attempts(rt, wid) == []
        step = await _step(rt, wid)
        assert (step["status"], step["attempt"]) == ("queued", 2)
        assert (await client.get(wid)).status is WorkflowStatus.RUNNING
        assert await fetch(rt, "SELECT seq FROM checkpoints") == []
        types = [r["type"] for r in await fetch(rt, "SELECT type FROM events ORDER BY id")]
        assert "step.completed" not in types


# 8. Reclaim --------------------------------------------------------------------------------


async def test_reclaim_cursor_reaches_a_dead_consumers_entry_behind_others(rt: Runtime) -> None:
    agent, idle = "gated", 50
    stream, group = rt.keys.stream(agent), rt.keys.group(agent)
    await streams.ensure_group(rt.redis, rt.keys, agent)
    # Three entries whose steps stay leased elsewhere: taken, never acknowledged, idle again.
    ahead = [await rt.redis.xadd(stream, {b"e": b"ahead"}) for _ in range(3)]
    await rt.redis.xreadgroup(group, "busy", {stream: ">"}, count=3)
    behind = await rt.redis.xadd(stream, {b"e": b"behind"})
    await rt.redis.xreadgroup(group, "dead", {stream: ">"}, count=1)

    await anyio.sleep(idle / 1000 + 0.02)
    cursor, first = await streams.reclaim(rt.redis, rt.keys, agent, "me", min_idle_ms=idle, count=2)
    assert [e.id for e in first] == ahead[:2] and cursor != "-"
    await anyio.sleep(idle / 1000 + 0.02)  # those two are idle again
    cursor, second = await streams.reclaim(
        rt.redis, rt.keys, agent, "me", min_idle_ms=idle, count=2, start=cursor
    )
    assert [e.id for e in second] == [ahead[2], behind]
    cursor, third = await streams.reclaim(
        rt.redis, rt.keys, agent, "me", min_idle_ms=idle, count=2, start=cursor
    )
    assert third == [] and cursor == "-"  # wrapped around


async def test_reclaim_acknowledges_an_entry_deleted_while_pending(rt: Runtime) -> None:
    agent, idle = "flaky", 50
    stream, group = rt.keys.stream(agent), rt.keys.group(agent)
    await streams.ensure_group(rt.redis, rt.keys, agent)
    gone = await rt.redis.xadd(stream, {b"e": b"trimmed away"})
    kept = await rt.redis.xadd(stream, {b"e": b"still there"})
    await rt.redis.xreadgroup(group, "dead", {stream: ">"}, count=2)
    await rt.redis.xdel(stream, gone)

    await anyio.sleep(idle / 1000 + 0.02)
    _, taken = await streams.reclaim(rt.redis, rt.keys, agent, "me", min_idle_ms=idle, count=10)
    assert [e.id for e in taken] == [kept]
    pending = await rt.redis.xpending_range(stream, group, "-", "+", 10)
    assert [p["message_id"] for p in pending] == [kept]


# 9. Cancel vs completion lock order --------------------------------------------------------


async def test_cancel_and_completion_take_locks_in_the_same_order(rt: Runtime) -> None:
    client = Client(rt)
    wid = await client.submit("gated", TICKET)
    step_id = (await client.get(wid)).steps[0].id
    result: dict[str, Any] = {}
    async with (
        rt.pool.acquire() as completion,
        rt.pool.acquire() as canceller,
        owner_connection(rt) as watcher,
    ):
        pid = canceller.get_server_pid()

        async def cancel() -> None:
            result["promoted"] = await recovery.cancel(canceller, wid)

        with anyio.fail_after(10):
            tx = completion.transaction()
            await tx.start()
            # The completion's order: the step row first ...
            await completion.execute("UPDATE steps SET updated_at = now() WHERE id = $1", step_id)
            async with anyio.create_task_group() as tg:
                tg.start_soon(cancel)
                wait = "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1"
                while await watcher.fetchval(wait, pid) != "Lock":
                    await anyio.sleep(0.01)
                # ... then the workflow row, while cancel waits: no deadlock either side.
                await completion.execute(
                    "UPDATE workflows SET updated_at = now() WHERE id = $1", wid
                )
                await tx.commit()
    assert result["promoted"] == []  # cancelled (None would mean it had finished)
    record = await client.get(wid)
    assert record.status is WorkflowStatus.CANCELLED
    assert [s.status for s in record.steps] == ["cancelled"]


# 10. Missing schema ------------------------------------------------------------------------


async def test_missing_schema_is_refused_by_name(settings: Settings, probe: Probe) -> None:
    schema = f"does_not_exist_{secrets.token_hex(3)}"
    missing = settings.model_copy(update={"db_schema": schema})
    with pytest.raises(ConfigurationError, match=f"schema '{schema}' does not exist"):
        async with open_runtime(missing, build_promise_app(probe), apply_migrations=False):
            pytest.fail("a runtime opened on a schema that does not exist")
    assert settings.database_url
    conn = await asyncpg.connect(settings.database_url)
    try:
        assert await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema) is None
    finally:
        await conn.close()


# 11. Submit idempotency ---------------------------------------------------------------------


async def test_submit_idempotency_same_key_returns_the_same_workflow(rt: Runtime) -> None:
    client = Client(rt)
    first = await client.submit("gated", TICKET, key="k1")
    assert await client.submit("gated", TICKET, key="k1") == first
    other_tenant = TICKET.model_copy(update={"tenant_id": "t2"})
    other = await client.submit("gated", other_tenant, key="k1")
    assert other != first

    rows = await fetch(rt, "SELECT id, tenant_id, submit_key FROM workflows ORDER BY tenant_id")
    assert [(r["id"], r["tenant_id"], r["submit_key"]) for r in rows] == [
        (first, "t1", "k1"),
        (other, "t2", "k1"),
    ]
    assert len(await fetch(rt, "SELECT id FROM steps")) == 2
    entries: Any = await rt.redis.xrange(rt.keys.stream("gated"))
    enqueued = [streams.decode(streams.Entry(i, f)).workflow_id for i, f in entries]
    assert enqueued == [first, other]


def _index_names(plan: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(plan, dict):
        if "Index Name" in plan:
            names.add(plan["Index Name"])
        for value in plan.values():
            names |= _index_names(value)
    elif isinstance(plan, list):
        for value in plan:
            names |= _index_names(value)
    return names


async def test_submit_session_check_uses_an_index(rt: Runtime) -> None:
    async with rt.db() as conn:
        await conn.execute(
            """
            INSERT INTO sessions (id, tenant_id, customer_id)
            SELECT 's-' || g, 't1', 'c1' FROM generate_series(1, 2000) g;
            INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state,
                                   app_version)
            SELECT gen_random_uuid(), 't1', 's-' || g, 'gated',
                   CASE WHEN g % 50 = 0 THEN 'running' ELSE 'completed' END, '{}', '{}', 'test'
            FROM generate_series(1, 2000) g;
            ANALYZE sessions;
            ANALYZE workflows;
            """
        )
        state = {"ticket": TICKET.model_dump(mode="json")}
        plan = await conn.fetchval(
            "EXPLAIN (FORMAT JSON) " + workflows.CREATE_WORKFLOW,
            uuid4(),
            uuid4(),
            "s-100",
            "t1",
            "c1",
            "gated",
            state,
            "test",
            "subject\n\nbody",
            "gated",
            {"pipeline": "gated", "first_agent": "gated"},
            None,
            False,
            None,  # traceparent
        )
        assert "workflows_session_open" in _index_names(json.loads(plan)), plan
        # Nothing was written by EXPLAIN.
        assert await conn.fetchval("SELECT count(*) FROM workflows") == 2000


# 12. Bounded -----------------------------------------------------------------------------------


async def test_bounded_housekeeping_trims_streams_drops_dead_consumers_caps_dead_letters(
    rt: Runtime, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1, reconcile=False)
    gated, flaky = rt.keys.stream("gated"), rt.keys.stream("flaky")
    ids = [await client.submit("gated", TICKET) for _ in range(5)]
    for _ in ids:
        await worker.process("gated", await _read(rt, "gated", worker.consumer))
    assert set((await client.wait(ids, timeout=10)).values()) == {WorkflowStatus.COMPLETED}
    assert await rt.redis.xlen(gated) == 5  # all acknowledged, all still there
    # One entry taken by a worker that died before acknowledging it.
    await client.submit("flaky", TICKET)
    await _read(rt, "flaky", "ghost")
    # A live worker that holds nothing.
    await rt.redis.set(rt.keys.worker_alive("idle-but-alive"), "1", px=60_000)
    await rt.redis.xgroup_createconsumer(gated, "gated", "idle-but-alive")

    await Reconciler(rt).housekeeping()
    assert await rt.redis.xlen(gated) == 0
    assert await rt.redis.xlen(flaky) == 1  # the unacknowledged entry is kept
    names = {c["name"] for c in await rt.redis.xinfo_consumers(gated, "gated")}
    assert names == {b"idle-but-alive"}  # the dead worker's consumer is gone
    names = {c["name"] for c in await rt.redis.xinfo_consumers(flaky, "flaky")}
    assert names == {b"ghost"}  # dead, but it still holds an entry

    # The dead-letter stream is capped (approximately: whole stream nodes are dropped).
    cap = 10
    monkeypatch.setattr(streams, "DEAD_LETTER_MAXLEN", cap)
    config: Any = await rt.redis.config_get("stream-node-max-entries")
    node = int(config["stream-node-max-entries"])
    bad = streams.Entry(b"0-1", {b"e": b"not an envelope"})
    for _ in range(2 * node + cap):
        await streams.dead_letter(rt.redis, rt.keys, "gated", bad, "malformed envelope")
    assert cap <= await rt.redis.xlen(rt.keys.dead_letter_stream()) <= cap + node
