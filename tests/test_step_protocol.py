"""Claim, fence and tool-ledger behaviour of the step protocol."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
import pytest

from orchestrator.client import Client
from orchestrator.coordination import delayed, streams
from orchestrator.engine.worker import Worker
from orchestrator.errors import FenceRejected
from orchestrator.runtime import Runtime
from orchestrator.schemas import TaskEnvelope, WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.context import StepContext
from orchestrator.store import recovery, steps
from tests.apps import TICKET, Done, Probe, TicketIn, build_app
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(probe)) as runtime:
        yield runtime


async def _next_entry(rt: Runtime, worker: Worker, agent: str) -> streams.Entry:
    await streams.ensure_group(rt.redis, rt.keys, agent)
    await anyio.sleep(0.05)  # let a scheduled retry (backoff 10-20 ms here) come due
    await delayed.move_due(rt.redis, rt.keys)
    entries = await streams.read(rt.redis, rt.keys, agent, worker.consumer, count=1, block_ms=2000)
    assert len(entries) == 1
    return entries[0]


async def test_claim_is_refused_for_a_completed_step(rt: Runtime, probe: Probe) -> None:
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("gated", TICKET)
    entry = await _next_entry(rt, worker, "gated")
    await worker.process("gated", entry)
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED

    # The same envelope delivered again (a duplicate XADD, a reclaim): refused, not re-run.
    await rt.redis.xadd(rt.keys.stream("gated"), entry.fields)
    duplicate = await _next_entry(rt, worker, "gated")
    await worker.process("gated", duplicate)

    attempts = await fetch(rt, "SELECT attempt, outcome FROM step_attempts")
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "completed")]
    pending = await rt.redis.xpending(rt.keys.stream("gated"), "gated")
    assert pending["pending"] == 0  # the duplicate was acknowledged


async def test_fenced_completion_loses_to_a_newer_attempt(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("gated", TICKET)
    stale = await _next_entry(rt, worker, "gated")

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.process, "gated", stale)
        await probe.entered.wait()  # the first worker is inside the agent, attempt 1
        async with rt.pool.acquire() as conn:
            step = (await client.get(wid)).steps[0]
            newer = await recovery.requeue(conn, step.id)  # e.g. the lease expired
        assert newer is not None and newer.attempt == 2
        probe.gate.set()  # attempt 1 now tries to complete, and must lose

    record = await client.get(wid)
    assert record.status is WorkflowStatus.RUNNING
    assert record.steps[0].attempt == 2 and record.steps[0].status == "queued"

    await streams.enqueue(rt.redis, rt.keys, newer)
    await worker.process("gated", await _next_entry(rt, worker, "gated"))
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    attempts = await fetch(rt, "SELECT attempt, outcome FROM step_attempts")
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(2, "completed")]


async def test_stale_completion_is_rejected_by_the_store(rt: Runtime, probe: Probe) -> None:
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("gated", TICKET)
    envelope = streams.decode(await _next_entry(rt, worker, "gated"))
    async with rt.pool.acquire() as conn:
        await recovery.requeue(conn, envelope.step_id)
        outcome = steps.Outcome(
            output={"value": "x"},
            state=envelope.payload,
            next_agents=(),
            tool_runs=[],
            messages=[],
            worker="w",
            started_at=(await client.get(wid)).created_at,
        )
        with pytest.raises(FenceRejected):
            await steps.complete(conn, envelope, outcome, steps.OpenStep(True, ""))


async def test_a_linear_step_starts_from_the_workflow_state_not_a_copy(
    rt: Runtime, probe: Probe
) -> None:
    """A step alone in its workflow stores no input, and a checkpoint only what its step
    changed (migration V13): a requeue rebuilds the envelope from the workflow's state,
    exactly what the parent handed on, which the checkpoints fold back to."""
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("two_steps", TICKET)
    await worker.process("gated", await _next_entry(rt, worker, "gated"))
    handed = streams.decode(await _next_entry(rt, worker, "flaky"))

    rows = await fetch(rt, "SELECT seq, input FROM steps WHERE workflow_id = $1 ORDER BY seq", wid)
    assert [(r["seq"], r["input"]) for r in rows] == [(0, None), (1, None)]
    [checkpoint] = await fetch(rt, "SELECT state FROM checkpoints WHERE workflow_id = $1", wid)
    assert list(checkpoint["state"]) == ["gated"]  # the parent's output, nothing more
    async with rt.pool.acquire() as conn:
        requeued = await recovery.requeue(conn, handed.step_id)
    assert requeued is not None and requeued.attempt == handed.attempt + 1
    [first] = await fetch(rt, "SELECT input FROM workflows WHERE id = $1", wid)
    assert requeued.payload == handed.payload == {**first["input"], **checkpoint["state"]}


async def test_rerun_step_returns_recorded_tool_results(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = 1
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("flaky", TICKET)
    await worker.process("flaky", await _next_entry(rt, worker, "flaky"))  # attempt 1 fails
    record = await client.get(wid)
    assert record.steps[0].attempt == 2 and record.status is WorkflowStatus.RUNNING

    await worker.process("flaky", await _next_entry(rt, worker, "flaky"))  # attempt 2 (retry)
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    assert record.steps[0].output == {"value": "hello:5"}
    assert probe.calls == {"lookup": 1, "charge": 1}  # neither tool ran twice

    runs = await fetch(
        rt, "SELECT idempotency_key, tool, status, attempt, result FROM tool_runs ORDER BY ordinal"
    )
    assert [(r["tool"], r["status"], r["attempt"]) for r in runs] == [
        ("lookup", "succeeded", 1),
        ("charge", "succeeded", 1),
    ]
    assert runs[1]["result"]["key"] == f"{wid}:0:1"
    outcomes = await fetch(rt, "SELECT attempt, outcome, error FROM step_attempts ORDER BY attempt")
    assert [(o["attempt"], o["outcome"]) for o in outcomes] == [(1, "failed"), (2, "completed")]
    assert "transient failure" in outcomes[0]["error"]


async def test_failing_step_fails_the_workflow_after_max_attempts(
    rt: Runtime, probe: Probe
) -> None:
    probe.failures_left = 99
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("flaky", TICKET)
    for _ in range(rt.settings.max_attempts):
        await worker.process("flaky", await _next_entry(rt, worker, "flaky"))
    record = await client.get(wid)
    assert record.status is WorkflowStatus.FAILED
    assert record.error is not None and "transient failure" in record.error
    assert probe.calls == {"lookup": 1, "charge": 1}


async def test_malformed_envelope_is_dead_lettered_not_fatal(rt: Runtime, probe: Probe) -> None:
    worker = Worker(rt, concurrency=1)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    await rt.redis.xadd(rt.keys.stream("gated"), {b"e": b'{"schema_version": 1, "nope": true}'})
    await worker.process("gated", await _next_entry(rt, worker, "gated"))
    dead = await rt.redis.xrange(rt.keys.dead_letter_stream())
    assert len(dead) == 1 and dead[0][1][b"reason"].startswith(b"malformed envelope")
    assert (await rt.redis.xpending(rt.keys.stream("gated"), "gated"))["pending"] == 0


async def test_changed_code_on_resume_fails_loudly(settings: Settings) -> None:
    """Attempt 1 recorded lookup then charge; the new code calls charge first."""
    from orchestrator.app import App
    from orchestrator.errors import NonDeterminismError

    probe = Probe()
    probe.failures_left = 1
    old = build_app(probe)
    async with runtime_for(settings, old) as rt:
        client, worker = Client(rt), Worker(rt, concurrency=1)
        wid = await client.submit("flaky", TICKET)
        await worker.process("flaky", await _next_entry(rt, worker, "flaky"))  # fails, recorded

        new: App = build_app(Probe())
        flaky = new.agents["flaky"]

        async def reordered(self: object, ctx: StepContext, data: TicketIn) -> Done:
            await ctx.tool("charge", amount=5)
            return Done(value="never")

        flaky.run = reordered  # type: ignore[method-assign]
        changed = dataclasses.replace(rt, app=new)
        new_worker = Worker(changed, concurrency=1)
        await new_worker.process("flaky", await _next_entry(rt, new_worker, "flaky"))
        record = await client.get(wid)
        assert record.status is WorkflowStatus.FAILED
        assert record.error is not None and "non-determinism" in record.error
        assert NonDeterminismError.non_retryable
        [letter] = await Client(rt).dead_letters()
        assert "was lookup({'value': 'hello'}) when recorded, now charge" in letter.reason


async def test_a_handed_step_is_read_ahead_as_postgres_would_read_it(
    rt: Runtime, probe: Probe
) -> None:
    """The submit or completion that created a step knows its open read
    (``store.read_ahead``), and what it knows is what Postgres returns at that moment."""
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("two_steps", TICKET, session="s-1")
    first = await _next_entry(rt, worker, "gated")
    assert await _read_ahead_is_read(rt, streams.decode(first))
    await worker.process("gated", first)
    handed = streams.decode(await _next_entry(rt, worker, "flaky"))
    assert await _read_ahead_is_read(rt, handed)

    # The worker path: put back, the second step runs without its read and completes.
    async with rt.pool.acquire() as conn:
        [read] = await steps.open_steps(conn, [handed])
    rt.store.read_ahead.put(handed, read)
    await worker.process("flaky", await _redeliver(rt, worker, handed))
    assert rt.store.read_ahead.taken == 3  # this test's two takes, then the worker's
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED


async def _read_ahead_is_read(rt: Runtime, envelope: TaskEnvelope) -> bool:
    """Whether ``envelope``'s step was read ahead as Postgres reads it now (taken once)."""
    known = rt.store.read_ahead.take(envelope)
    async with rt.pool.acquire() as conn:
        [read] = await steps.open_steps(conn, [envelope])
    assert read.runnable and rt.store.read_ahead.take(envelope) is None
    return known == read


async def test_a_step_read_ahead_after_a_cancel_runs_no_fenced_effect(
    rt: Runtime, probe: Probe
) -> None:
    """What skipping the read gives up: a cancel between the handoff and the run is found
    by the run's fenced writes, not before it starts. A non-idempotent tool's call is
    refused, the completion writes nothing; only the idempotent lookup ran."""
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("two_steps", TICKET)
    await worker.process("gated", await _next_entry(rt, worker, "gated"))
    assert await client.cancel(wid) is not None
    await worker.process("flaky", await _next_entry(rt, worker, "flaky"))

    assert rt.store.read_ahead.taken == 2  # both steps ran on what their creator knew
    assert (probe.calls["lookup"], probe.calls["charge"]) == (1, 0)
    record = await client.get(wid)
    assert record.status is WorkflowStatus.CANCELLED
    assert [s.status for s in record.steps] == ["completed", "cancelled"]
    attempts = await fetch(rt, "SELECT outcome FROM step_attempts")
    assert [a["outcome"] for a in attempts] == ["completed"]  # the first step's only
    assert await fetch(rt, "SELECT 1 FROM tool_runs") == []
    pending = await rt.redis.xpending(rt.keys.stream("flaky"), "flaky")
    assert pending["pending"] == 0  # dropped, acknowledged


async def test_a_requeued_or_budgeted_step_is_read_not_assumed(rt: Runtime, probe: Probe) -> None:
    """The read-ahead holds the attempt the step was created with: a requeue's envelope
    reads Postgres. A tenant with a budget is never read ahead (others move its spend)."""
    probe.gate.set()
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("two_steps", TICKET)
    await worker.process("gated", await _next_entry(rt, worker, "gated"))
    handed = streams.decode(await _next_entry(rt, worker, "flaky"))
    async with rt.pool.acquire() as conn:
        requeued = await recovery.requeue(conn, handed.step_id)
    assert requeued is not None and requeued.attempt == 2
    assert rt.store.read_ahead.take(requeued) is None
    await worker.process("flaky", await _redeliver(rt, worker, requeued))
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    assert rt.store.read_ahead.taken == 1  # the first step only, as submitted

    await rt.store.costs.set_budget(TICKET.tenant_id, Decimal(5))
    budgeted = await client.submit("two_steps", TICKET.model_copy(update={"subject": "again"}))
    assert len(rt.store.read_ahead) == 0
    await worker.process("gated", await _next_entry(rt, worker, "gated"))
    assert len(rt.store.read_ahead) == 0
    await worker.process("flaky", await _next_entry(rt, worker, "flaky"))
    assert (await client.get(budgeted)).status is WorkflowStatus.COMPLETED
    assert rt.store.read_ahead.taken == 1


async def _redeliver(rt: Runtime, worker: Worker, envelope: TaskEnvelope) -> streams.Entry:
    """``envelope`` as this worker's next entry of its agent's stream."""
    await streams.enqueue(rt.redis, rt.keys, envelope)
    entry = await _next_entry(rt, worker, envelope.agent)
    assert streams.decode(entry) == envelope
    return entry
