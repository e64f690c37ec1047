"""Retries, dead letters, reclaim, the reconciler, in-doubt tools, cancel and resume."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from orchestrator.cli.worker import serve
from orchestrator.client import Client
from orchestrator.coordination import delayed, streams
from orchestrator.coordination.locks import Lock
from orchestrator.engine.protocol import Held
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.store import recovery, tool_runs
from orchestrator.store.tool_runs import ToolRun
from tests.apps import TICKET, Probe, build_app
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    fast = settings.model_copy(update={"lease_seconds": 0.3, "stall_seconds": 0.2})
    async with runtime_for(fast, build_app(probe)) as runtime:
        yield runtime


async def _one(rt: Runtime, worker: Worker, agent: str) -> None:
    """Deliver the next entry of ``agent`` (moving due retries first) to ``worker``."""
    await streams.ensure_group(rt.redis, rt.keys, agent)
    await anyio.sleep(0.05)
    await delayed.move_due(rt.redis, rt.keys)
    entries = await streams.read(rt.redis, rt.keys, agent, worker.consumer, count=1, block_ms=2000)
    assert len(entries) == 1
    await worker.process(agent, entries[0])


async def _reclaim_after_a_lease(rt: Runtime, worker: Worker, agent: str) -> list[streams.Entry]:
    """Once a lease has passed, what ``worker`` reclaims of ``agent``'s idle entries."""
    await anyio.sleep(rt.settings.lease_seconds + 0.05)
    _, reclaimed = await streams.reclaim(
        rt.redis,
        rt.keys,
        agent,
        worker.consumer,
        min_idle_ms=int(rt.settings.lease_seconds * 1000),
        count=5,
    )
    return reclaimed


async def test_retry_is_scheduled_durably_with_backoff(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = 1
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("flaky", TICKET)
    await _one(rt, worker, "flaky")
    rows = await fetch(rt, "SELECT attempt, not_before > updated_at AS later FROM steps")
    assert [(r["attempt"], r["later"]) for r in rows] == [(2, True)]
    assert await rt.redis.zcard(rt.keys.delayed()) == 1
    await _one(rt, worker, "flaky")
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED


async def test_a_newer_attempt_takes_the_lease_from_a_stale_holder(
    rt: Runtime, probe: Probe
) -> None:
    """Redis lost a running step's lease; the reconciler moved its fence (attempt 2) and
    enqueued it; then attempt 1, alive on another worker, re-took the lease on its
    heartbeat. The delivery of attempt 2 runs at once, not after a takeover (attempt 3)."""
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("flaky", TICKET)
    [row] = await fetch(rt, "SELECT id FROM steps WHERE workflow_id = $1", wid)
    newer = await rt.store.requeue(row["id"], reason="stalled", seen_attempt=1)
    assert newer is not None and newer.attempt == 2
    await streams.enqueue(rt.redis, rt.keys, newer)
    stale = Lock(rt.redis, rt.keys.step_lock(wid, 0), 60_000, owner="elsewhere", fence=1)
    assert await stale.acquire()
    await rt.redis.set(rt.keys.worker_alive("elsewhere"), "1", ex=60)

    await _one(rt, worker, "flaky")  # attempt 1's own entry: the live holder keeps it
    assert probe.calls["lookup"] == 0 and await stale.extend()
    await _one(rt, worker, "flaky")  # attempt 2: the stale holder cannot land anything
    assert probe.calls["lookup"] == 1
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    [done] = await fetch(rt, "SELECT attempt FROM steps WHERE workflow_id = $1", wid)
    assert done["attempt"] == 2
    assert not await stale.extend()  # its next heartbeat finds the lease gone: superseded


async def test_a_retry_is_stalled_only_a_stall_time_after_it_falls_due(
    rt: Runtime, probe: Probe
) -> None:
    """A backoff longer than the stall time must not make a retry look stalled the moment
    it is due (the reconciler would requeue it under a new attempt, beside its own entry)."""
    await Client(rt).submit("flaky", TICKET)
    await fetch(
        rt,
        "UPDATE steps SET updated_at = now() - interval '10 s',"
        " not_before = now() - interval '0.1 s'",
    )
    assert await rt.store.stalled(older_than=1.0) == []
    await fetch(rt, "UPDATE steps SET not_before = now() - interval '2 s'")
    [step] = await rt.store.stalled(older_than=1.0)
    assert 1.9 < step.idle_seconds < 5


async def test_heartbeat_keeps_a_step_waiting_out_an_outage(rt: Runtime, probe: Probe) -> None:
    """A step waiting out an outage keeps its lease (taken again if Redis lost it) and its
    entry fresh, so no other worker takes it for silent once Redis is back."""
    worker = Worker(rt, concurrency=1)
    wid = await Client(rt).submit("flaky", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "flaky")
    [entry] = await streams.read(
        rt.redis, rt.keys, "flaky", worker.consumer, count=1, block_ms=1000
    )
    lock = Lock(rt.redis, rt.keys.step_lock(wid, 0), 60_000, owner=worker.consumer, fence=1)
    worker.runner.held[lock] = Held(lock, "flaky", entry.id)
    await anyio.sleep(0.3)
    await worker._heartbeat()
    stream, group = rt.keys.stream("flaky"), rt.keys.group("flaky")
    [pending] = await rt.redis.xpending_range(stream, group, "-", "+", 1)
    assert pending["time_since_delivered"] < 250
    assert await rt.redis.get(lock.name) == lock.token.encode()


async def test_out_of_attempts_dead_letters_then_retry_resumes(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = rt.settings.max_attempts
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("flaky", TICKET)
    for _ in range(rt.settings.max_attempts):
        await _one(rt, worker, "flaky")
    assert (await client.get(wid)).status is WorkflowStatus.FAILED
    [letter] = await client.dead_letters()
    assert letter.workflow_id == wid and "transient failure" in letter.reason
    dead_stream = await rt.redis.xrange(rt.keys.dead_letter_stream())
    assert len(dead_stream) == 1 and dead_stream[0][1][b"agent"] == b"flaky"

    probe.failures_left = 0
    assert await client.retry_dead_letter(letter.id) == wid
    await _one(rt, worker, "flaky")
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    assert record.steps[0].attempt == rt.settings.max_attempts + 1
    assert probe.calls == {"lookup": 1, "charge": 1}  # resumed from the recorded tool results
    assert await client.dead_letters() == []


async def test_reclaim_takes_over_an_entry_whose_worker_died(rt: Runtime, probe: Probe) -> None:
    probe.gate.set()
    client = Client(rt)
    dead, alive = Worker(rt, concurrency=1), Worker(rt, concurrency=1)
    wid = await client.submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    taken = await streams.read(rt.redis, rt.keys, "gated", dead.consumer, count=1, block_ms=1000)
    assert len(taken) == 1  # delivered to a worker that then "dies" without acknowledging

    reclaimed = await _reclaim_after_a_lease(rt, alive, "gated")
    assert [e.id for e in reclaimed] == [taken[0].id]
    await alive.process("gated", reclaimed[0], takeover=True)
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    pending = await rt.redis.xpending_range(rt.keys.stream("gated"), "gated", "-", "+", 10)
    assert pending == []


async def test_reconciler_rebuilds_work_when_redis_loses_everything(
    rt: Runtime, probe: Probe
) -> None:
    probe.gate.set()
    client = Client(rt)
    ids = [await client.submit("gated", TICKET) for _ in range(5)]
    # Redis loses every key of this deployment (the same as FLUSHALL for us).
    keys = [k async for k in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*")]
    await rt.redis.delete(*keys)

    await anyio.sleep(rt.settings.stall_after + 0.05)
    report = await Reconciler(rt).pass_once()
    assert report.requeued == 5
    worker = Worker(rt, concurrency=5, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        statuses = await client.wait(ids, timeout=20)
        worker.stop()
    assert set(statuses.values()) == {WorkflowStatus.COMPLETED}
    attempts = await fetch(rt, "SELECT attempt FROM steps")
    assert {a["attempt"] for a in attempts} == {2}  # the requeue fenced attempt 1 out


async def test_in_doubt_call_without_reconcile_is_dead_lettered(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("refunder", TICKET)
    step = (await client.get(wid)).steps[0]
    async with rt.pool.acquire() as conn:  # a worker died after charging, before recording
        await tool_runs.start(
            conn, wid, step.id, 1, ToolRun(f"{wid}:0:0", 0, "charge", "started", {"amount": 7}), 0.0
        )
    await _one(rt, worker, "refunder")
    record = await client.get(wid)
    assert record.status is WorkflowStatus.FAILED
    assert probe.calls["charge"] == 0  # never re-run blindly
    [letter] = await client.dead_letters()
    assert letter.reason.startswith("ToolError: in doubt: tool 'charge'")


@pytest.mark.parametrize("found", [None, {"refunded": 7}])
async def test_in_doubt_call_is_settled_by_reconcile(
    rt: Runtime, probe: Probe, found: dict[str, object] | None
) -> None:
    probe.refund_found = found
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("refunder", TICKET)
    step = (await client.get(wid)).steps[0]
    async with rt.pool.acquire() as conn:
        await tool_runs.start(
            conn, wid, step.id, 1, ToolRun(f"{wid}:0:0", 0, "charge", "started", {"amount": 7}), 0.0
        )
        await conn.execute(
            "UPDATE tool_runs SET status = 'succeeded', result = $1",
            {"charged": 7, "key": f"{wid}:0:0"},
        )
        await tool_runs.start(
            conn, wid, step.id, 1, ToolRun(f"{wid}:0:1", 1, "refund", "started", {"amount": 7}), 0.0
        )
    await _one(rt, worker, "refunder")
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    assert probe.calls["refund_check"] == 1
    assert probe.calls["refund"] == (1 if found is None else 0)
    assert probe.calls["charge"] == 0


async def test_cancel_takes_effect_at_the_next_step_boundary(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("two_steps", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    [entry] = await streams.read(
        rt.redis, rt.keys, "gated", worker.consumer, count=1, block_ms=1000
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.process, "gated", entry)
        await probe.entered.wait()
        assert await client.cancel(wid)
        probe.gate.set()
    assert probe.cancel_seen is True  # the running step could see it
    record = await client.get(wid)
    assert record.status is WorkflowStatus.CANCELLED
    assert [s.agent for s in record.steps] == ["gated"]  # no handoff after the cancel
    assert not await client.cancel(wid)


async def test_poison_entry_is_recorded_in_postgres(rt: Runtime, probe: Probe) -> None:
    worker = Worker(rt, concurrency=1)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    await rt.redis.xadd(rt.keys.stream("gated"), {b"e": b"not json at all"})
    await _one(rt, worker, "gated")
    [letter] = await Client(rt).dead_letters()
    assert letter.workflow_id is None and letter.envelope == "not json at all"
    assert letter.reason.startswith("malformed envelope")


async def test_non_retryable_error_dead_letters_at_once(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("refuses", TICKET)
    await _one(rt, worker, "refuses")
    assert (await client.get(wid)).status is WorkflowStatus.FAILED
    assert probe.calls["refuses"] == 1
    [letter] = await client.dead_letters()
    assert letter.reason == "AgentError: the ticket is spam"


async def test_worker_stops_after_running_steps_finish(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=2)
    wid = await client.submit("gated", TICKET)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            await probe.entered.wait()
            worker.stop()  # as on SIGTERM: no new reads, the running step may finish
            await anyio.sleep(0.2)
            probe.gate.set()
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED


async def test_a_stop_while_the_runtime_opens_still_stops_the_worker(
    rt: Runtime, probe: Probe, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGTERM right after start lands before the Worker exists: it must still stop it."""
    stop = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, rt.settings, rt.app, stop)
            await anyio.sleep(0)  # serve is now inside open_runtime, waiting on a connection
            stop.set()
    # The worker was made after the stop (it printed its banner) and stopped anyway.
    assert "worker " in capsys.readouterr().err


async def test_reconciler_leaves_a_live_backlog_alone(rt: Runtime, probe: Probe) -> None:
    """Steps whose envelopes still wait in their stream, undelivered or pending, are not
    duplicated."""
    client = Client(rt)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    ids = [await client.submit("gated", TICKET) for _ in range(3)]
    await anyio.sleep(rt.settings.stall_after + 0.05)  # old enough to look stalled
    assert (await Reconciler(rt).pass_once()).requeued == 0
    assert await rt.redis.xlen(rt.keys.stream("gated")) == 3
    attempts = await fetch(rt, "SELECT attempt FROM steps WHERE workflow_id = ANY($1::uuid[])", ids)
    assert {a["attempt"] for a in attempts} == {1}

    # Delivered to a worker that then dies: its pending entries are taken over by a worker
    # (one recovery, one new attempt), not also re-enqueued.
    worker = Worker(rt, concurrency=3)
    taken = await streams.read(rt.redis, rt.keys, "gated", worker.consumer, count=3, block_ms=1000)
    assert len(taken) == 3
    await anyio.sleep(rt.settings.stall_after + 0.05)
    assert (await Reconciler(rt).pass_once()).requeued == 0

    # Once Redis has lost those entries, nobody has the steps: they are re-enqueued.
    await rt.redis.xdel(rt.keys.stream("gated"), *[e.id for e in taken])
    assert (await Reconciler(rt).pass_once()).requeued == 3


async def test_live_agent_status_follows_the_running_step(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    worker = Worker(rt, concurrency=2, reconcile=False)
    key = rt.keys.agent_status("gated", worker.consumer)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        wid = await client.submit("gated", TICKET)
        await probe.entered.wait()
        with anyio.fail_after(5):
            while (await rt.redis.hget(key, "status")) != b"running":
                await anyio.sleep(0.05)
        running = await rt.redis.hgetall(key)
        assert running[b"current_task"] == f"{wid}:0".encode()
        assert running[b"assigned_by"] == b"submit" and running[b"in_flight"] == b"1"
        assert 0 < await rt.redis.ttl(key) <= rt.settings.status_ttl_seconds
        probe.gate.set()
        await client.wait([wid], timeout=10)
        with anyio.fail_after(5):
            while (await rt.redis.hget(key, "status")) != b"idle":
                await anyio.sleep(0.05)
        worker.stop()
    assert (await rt.redis.hgetall(key))[b"checkpoint"] == b"0"


async def test_a_step_keeps_its_lease_while_its_claim_reads_slowly(
    rt: Runtime, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From the moment a worker takes a step's lease, its heartbeats keep the lease and
    the entry fresh: a Postgres read slower than the lease (a loaded server) does not
    make the step look paused, so nobody takes it over and it runs once, at attempt 1."""
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    [entry] = await streams.read(
        rt.redis, rt.keys, "gated", worker.consumer, count=1, block_ms=1000
    )
    # Taken here, so the claim reads Postgres: the submit's read-ahead would skip the read.
    assert rt.store.opened_ahead(streams.decode(entry)) is not None
    reading, go_on = anyio.Event(), anyio.Event()
    open_now = rt.store.open

    async def slow_open(envelope: Any) -> Any:
        reading.set()
        await go_on.wait()
        return await open_now(envelope)

    monkeypatch.setattr(rt.store, "open", slow_open)
    lock_name = rt.keys.step_lock(wid, 0)
    stream, group = rt.keys.stream("gated"), rt.keys.group("gated")
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.process, "gated", entry)
        await reading.wait()
        for _ in range(6):  # two leases, heartbeating as the worker does (every lease / 3)
            await anyio.sleep(rt.settings.lease_seconds / 3)
            await worker._heartbeat()
            held = await rt.redis.get(lock_name)
            assert held is not None and held.decode().startswith(f"{worker.consumer}|1.")
            [pending] = await rt.redis.xpending_range(stream, group, "-", "+", 1)
            assert pending["time_since_delivered"] < rt.settings.lease_seconds * 1000
        go_on.set()
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED and record.steps[0].attempt == 1
    assert worker.runner.held == {} and worker.runner.running == {}


async def test_a_stale_execution_ending_leaves_the_current_ones_lease_kept(
    rt: Runtime, probe: Probe
) -> None:
    """Two executions of one step on one worker (a stale attempt waiting out an outage, and
    the newer attempt's delivery) each keep their own heartbeat entry: the stale one ending
    must not stop the heartbeats of the newer one's lease."""
    worker = Worker(rt, concurrency=2)
    wid = await Client(rt).submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    [stale] = await streams.read(
        rt.redis, rt.keys, "gated", worker.consumer, count=1, block_ms=1000
    )
    async with rt.pool.acquire() as conn:
        newer = await recovery.requeue(conn, streams.decode(stale).step_id)
    assert newer is not None and newer.attempt == 2
    await streams.enqueue(rt.redis, rt.keys, newer)
    [current] = await streams.read(
        rt.redis, rt.keys, "gated", worker.consumer, count=1, block_ms=1000
    )
    lease = Lock(
        rt.redis,
        rt.keys.step_lock(wid, 0),
        int(rt.settings.lease_seconds * 1000),
        owner=worker.consumer,
        fence=2,
    )
    assert await worker.runner._lease(lease, newer, current)  # attempt 2, claiming
    await worker.runner.refresh_liveness()  # this worker is alive: its lease is not taken

    await worker.process("gated", stale)  # attempt 1: the lease is attempt 2's, it ends

    assert list(worker.runner.held) == [lease]
    assert await rt.redis.get(lease.name) == lease.token.encode()


async def test_two_entries_of_a_step_claimed_together_take_it_over_once(
    rt: Runtime, probe: Probe, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead worker left two entries of one step pending (attempt 1's, and attempt 2's
    from a requeue); a live worker reclaims both in one batch and runs them side by side.
    The one that leased first is taking the step over: the other must not take the lease
    from it as from a stale holder, or both move the fence (an attempt nothing failed)."""
    probe.gate.set()
    client = Client(rt)
    dead, alive = Worker(rt, concurrency=2), Worker(rt, concurrency=2)
    wid = await client.submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    [first] = await streams.read(rt.redis, rt.keys, "gated", dead.consumer, count=1, block_ms=1000)
    async with rt.pool.acquire() as conn:
        newer = await recovery.requeue(conn, streams.decode(first).step_id)
    assert newer is not None and newer.attempt == 2
    await streams.enqueue(rt.redis, rt.keys, newer)
    [second] = await streams.read(rt.redis, rt.keys, "gated", dead.consumer, count=1, block_ms=1000)
    both = await _reclaim_after_a_lease(rt, alive, "gated")
    assert [e.id for e in both] == [first.id, second.id]
    await rt.redis.set(rt.keys.worker_alive(alive.consumer), "1", ex=60)

    # Hold each takeover's new fence until the other execution has had its go at the lease.
    calls, go_on = [0], anyio.Event()
    take_over_now = rt.store.take_over

    async def held_take_over(envelope: Any, by: str) -> Any:
        calls[0] += 1
        await go_on.wait()
        return await take_over_now(envelope, by)

    monkeypatch.setattr(rt.store, "take_over", held_take_over)
    second_done = anyio.Event()

    async def run(entry: streams.Entry, done: anyio.Event) -> None:
        await alive.process("gated", entry, takeover=True)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, both[0], anyio.Event())
        with anyio.fail_after(5):
            while calls[0] < 1:  # attempt 1's execution holds the lease, taking over
                await anyio.sleep(0.01)
        tg.start_soon(run, both[1], second_done)
        with anyio.fail_after(5):
            while calls[0] < 2 and not second_done.is_set():
                await anyio.sleep(0.01)
        go_on.set()

    assert calls[0] == 1  # only the lease's holder moved the fence
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED and record.steps[0].attempt == 3
    [taken] = await fetch(
        rt,
        "SELECT count(*) AS n FROM events WHERE type = 'step.taken_over' AND workflow_id = $1",
        wid,
    )
    assert taken["n"] == 1
    # The loser's entry stays pending on the live worker (a later reclaim finds the step
    # closed and acknowledges it); the winner's is acknowledged.
    pending = await rt.redis.xpending_range(rt.keys.stream("gated"), "gated", "-", "+", 10)
    assert [p["message_id"] for p in pending] == [second.id]
