"""Durable waits end to end: ctx.sleep, ctx.wait_for, ctx.ask and client.signal.

One agent plays a script of waits (``sleep:S``, ``wait:NAME[:TIMEOUT]``, ``ask:Q``) and
reports every run and every wait's result into a ``Probe`` owned by the test, so the
count of runs and what each replayed wait returned are checked outside the runtime.
Timers are short (0.3-0.5 s, woken every 0.1 s); where a test needs a parked step to
stay parked while something else happens, it sleeps long and the test moves the due
time instead of racing a clock. No timing is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import anyio
import pytest
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine import timers
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput, WaitTimedOut, WorkflowNotFound
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio
# Client.wait checks Postgres every ``poll`` seconds and, as written, waits out one
# interval even when everything it waits for has ended: keep the interval short.
POLL = 0.05


class Plan(BaseModel):
    name: str
    script: list[str]


class PlanIn(AgentInput):
    input: Plan


class Out(AgentOutput):
    value: str


class Probe:
    def __init__(self) -> None:
        self.runs = Counter[str]()  # plan name -> executions of its step
        self.log: list[tuple[str, int, str, Any]] = []  # (plan, run, op, result)

    def results(self, plan: str, op: str) -> list[Any]:
        """What ``op`` returned in each run that reached it, in order."""
        return [r for p, _, o, r in self.log if p == plan and o == op]


def build_app(probe: Probe) -> App:
    app = App("waits-test", version="test")

    @app.agent
    class Script(Agent[PlanIn, Out]):
        name = "script"
        input_model = PlanIn
        output_model = Out

        async def run(self, ctx: StepContext, data: PlanIn) -> Out:
            plan = data.input
            probe.runs[plan.name] += 1
            run = probe.runs[plan.name]
            results: list[Any] = []
            for op in plan.script:
                kind, _, arg = op.partition(":")
                result: Any
                if kind == "sleep":
                    await ctx.sleep(timedelta(seconds=float(arg)))
                    result = "slept"
                elif kind == "wait":
                    name, _, timeout = arg.partition(":")
                    try:
                        seconds = float(timeout) if timeout else None
                        result = await ctx.wait_for(name, timeout=seconds)
                    except WaitTimedOut:
                        result = "timed out"
                else:
                    question, _, timeout = arg.partition(":")
                    try:
                        result = ctx.ask(question, timeout=float(timeout) if timeout else None)
                    except WaitTimedOut:
                        result = "timed out"
                probe.log.append((plan.name, run, op, result))
                results.append(result)
            return Out(value=json.dumps(results))

    app.pipeline("script", ["script"], input_model=Plan)
    app.validate()
    return app


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(update={"timer_interval_seconds": 0.1})


@pytest.fixture
async def rt(fast: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(fast, build_app(probe)) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def worker(rt: Runtime, concurrency: int = 2, reconcile: bool = False) -> AsyncIterator[None]:
    running = Worker(rt, concurrency=concurrency, reconcile=reconcile)
    async with anyio.create_task_group() as tg:
        tg.start_soon(running.run)
        try:
            yield
        finally:
            running.stop()


async def _until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll ``check`` (sync or async) until true: a hang guard, not a timing assert."""
    with anyio.fail_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)


async def _step(rt: Runtime, wid: UUID) -> dict[str, Any]:
    [row] = await fetch(
        rt,
        """SELECT id, status, attempt, waiting_for, question, not_before, waits,
                  extract(epoch FROM not_before - now()) AS due_in
           FROM steps WHERE workflow_id = $1""",
        wid,
    )
    return dict(row)


async def _parked(rt: Runtime, wid: UUID, on: str | None = None) -> bool:
    """The step is parked (on the signal ``on``) and its workflow shows it."""
    step = await _step(rt, wid)
    workflow = await Client(rt).get(wid)
    return (
        step["status"] == "waiting"
        and step["waiting_for"] == on
        and workflow.status is WorkflowStatus.WAITING
    )


async def _finish(rt: Runtime, wid: UUID) -> list[Any]:
    """Wait for the workflow; it completed; the results of its script."""
    statuses = await Client(rt).wait([wid], timeout=10, poll=POLL)
    assert statuses[wid] is WorkflowStatus.COMPLETED, (await Client(rt).get(wid)).error
    value: list[Any] = json.loads((await Client(rt).get(wid)).state["script"]["value"])
    return value


async def _events(rt: Runtime, wid: UUID, kind: str) -> int:
    rows = await fetch(
        rt, "SELECT count(*) AS n FROM events WHERE workflow_id = $1 AND type = $2", wid, kind
    )
    return int(rows[0]["n"])


async def _signals(rt: Runtime, wid: UUID) -> list[tuple[str, Any, int | None]]:
    rows = await fetch(
        rt,
        "SELECT name, payload, ordinal FROM signals WHERE workflow_id = $1 ORDER BY id",
        wid,
    )
    return [(r["name"], r["payload"], r["ordinal"]) for r in rows]


# Sleep -----------------------------------------------------------------------------------


async def test_sleep_parks_without_holding_the_worker_then_completes(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    async with worker(rt, concurrency=1):
        long = await client.submit("script", Plan(name="long", script=["sleep:30"]))
        await _until(lambda: _parked(rt, long))
        step = await _step(rt, long)
        assert 20 < step["due_in"] < 40  # the due time is in Postgres, ~30 s ahead
        # The only slot is free: another workflow of the same agent runs meanwhile.
        short = await client.submit("script", Plan(name="short", script=["sleep:0"]))
        assert await _finish(rt, short) == ["slept"]
        assert await _parked(rt, long) and probe.runs["long"] == 1
        # Time passes (the due time moves to now, as recorded for the replay too).
        async with rt.db() as conn:
            await conn.execute(
                """UPDATE steps SET not_before = now(),
                                    waits = jsonb_build_array(extract(epoch FROM now()))
                   WHERE id = $1""",
                step["id"],
            )
        assert await _finish(rt, long) == ["slept"]
    assert probe.runs == Counter(long=2, short=1)  # parked once, re-run once from the start
    assert await _events(rt, long, "step.waiting") == 1
    assert await _events(rt, long, "step.woken") == 1
    attempts = await fetch(
        rt,
        """SELECT a.outcome FROM step_attempts a JOIN steps s ON s.id = a.step_id
           WHERE s.workflow_id = $1 ORDER BY a.attempt""",
        long,
    )
    assert [a["outcome"] for a in attempts] == ["waiting", "completed"]


async def test_sleep_survives_losing_redis_while_parked(fast: Settings, probe: Probe) -> None:
    recovering = fast.model_copy(update={"reconcile_interval_seconds": 0.2, "stall_seconds": 0.5})
    async with runtime_for(recovering, build_app(probe)) as rt, worker(rt, reconcile=True):
        wid = await Client(rt).submit("script", Plan(name="nap", script=["sleep:0.5"]))
        await _until(lambda: _parked(rt, wid))
        await _lose_redis(rt)
        assert await _finish(rt, wid) == ["slept"]
        assert probe.runs["nap"] == 2


async def _lose_redis(rt: Runtime) -> None:
    """FLUSHALL on the test session's own embedded Redis; on a shared one (REDIS_URL set)
    every key of this test's prefix instead: the runtime keeps nothing else there."""
    if not os.environ.get("REDIS_URL"):
        await rt.redis.flushall()
        return
    keys = [k async for k in rt.redis.scan_iter(match=f"{rt.settings.key_prefix}:*")]
    if keys:
        await rt.redis.delete(*keys)


async def test_an_instant_sleep_before_a_real_one_is_replayed_as_done(
    rt: Runtime, probe: Probe
) -> None:
    """sleep(0) parks nothing, but it is a wait of the step all the same: the sleep after
    it must replay as done once due, not park again (ordinals stay aligned)."""
    async with worker(rt):
        wid = await Client(rt).submit("script", Plan(name="z", script=["sleep:0", "sleep:0.3"]))
        assert await _finish(rt, wid) == ["slept", "slept"]
    assert probe.runs["z"] == 2
    assert await _events(rt, wid, "step.waiting") == 1


# Signals ---------------------------------------------------------------------------------


async def test_wait_for_returns_a_signal_sent_after_it_parked(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    async with worker(rt):
        wid = await client.submit("script", Plan(name="after", script=["wait:approval:30"]))
        await _until(lambda: _parked(rt, wid, on="approval"))
        assert await client.signal(wid, "approval", {"by": "ana", "ok": True}) is True
        assert await _finish(rt, wid) == [{"by": "ana", "ok": True}]
    assert probe.runs["after"] == 2
    assert await _signals(rt, wid) == [("approval", {"by": "ana", "ok": True}, 0)]


async def test_a_signal_sent_before_the_wait_is_kept_and_returned_at_once(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    wid = await client.submit("script", Plan(name="before", script=["wait:approval:30"]))
    assert await client.signal(wid, "approval", "yes") is False  # nobody waits yet: kept
    assert await client.signal(wid, "other", "ignored") is False
    async with worker(rt):
        assert await _finish(rt, wid) == ["yes"]
    assert probe.runs["before"] == 1  # never parked
    assert await _events(rt, wid, "step.waiting") == 0
    assert await _signals(rt, wid) == [("approval", "yes", 0), ("other", "ignored", None)]


async def test_wait_for_times_out_and_the_agent_carries_on(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    async with worker(rt):
        wid = await client.submit("script", Plan(name="late", script=["wait:approval:0.3"]))
        assert await _finish(rt, wid) == ["timed out"]
    assert probe.runs["late"] == 2  # parked, woken by the timer, timed out on the re-run
    with pytest.raises(InvalidInput, match="is completed; it takes no signals"):
        await client.signal(wid, "approval", "too late")
    assert await _signals(rt, wid) == []


@pytest.mark.parametrize(
    ("sent", "runs", "firsts"),
    [
        ("each after its wait parked", 3, 2),
        ("first before the step ran", 2, 2),
        ("second while the first waited", 2, 1),
        ("both before the step ran", 1, 1),
    ],
)
async def test_two_waits_in_one_step_replay_what_they_took(
    rt: Runtime, probe: Probe, sent: str, runs: int, firsts: int
) -> None:
    client = Client(rt)
    wid = await client.submit("script", Plan(name="two", script=["wait:first", "wait:second"]))
    if sent.startswith(("first", "both")):
        assert await client.signal(wid, "first", "A") is False
    if sent.startswith("both"):
        assert await client.signal(wid, "second", "B") is False
    async with worker(rt):
        if sent.startswith("each"):
            await _until(lambda: _parked(rt, wid, on="first"))
            assert await client.signal(wid, "first", "A") is True
        if sent.startswith("second"):
            await _until(lambda: _parked(rt, wid, on="first"))
            assert await client.signal(wid, "second", "B") is False  # kept for later
            assert await client.signal(wid, "first", "A") is True
        if sent.startswith(("each", "first")):
            await _until(lambda: _parked(rt, wid, on="second"))
            assert await client.signal(wid, "second", "B") is True
        assert await _finish(rt, wid) == ["A", "B"]
    assert probe.runs["two"] == runs
    # Every run past the first wait got the one "A" sent (replayed, never waiting again).
    assert probe.results("two", "wait:first") == ["A"] * firsts
    assert probe.results("two", "wait:second") == ["B"]
    assert sorted(await _signals(rt, wid)) == [("first", "A", 0), ("second", "B", 1)]


async def test_a_signal_taken_at_once_keeps_the_sleep_after_it_aligned(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    wid = await client.submit("script", Plan(name="ws", script=["wait:go", "sleep:0.3"]))
    assert await client.signal(wid, "go", 1) is False
    async with worker(rt):
        assert await _finish(rt, wid) == [1, "slept"]
    assert probe.runs["ws"] == 2  # slept once, not twice
    assert await _events(rt, wid, "step.waiting") == 1


async def test_ask_then_wait_for(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    script = ["ask:Which order?", "wait:approval"]
    async with worker(rt):
        wid = await client.submit("script", Plan(name="asker", script=script))
        await _until(lambda: _parked(rt, wid, on="input"))
        assert (await _step(rt, wid))["question"] == "Which order?"
        await client.provide_input(wid, "ord-7")
        await _until(lambda: _parked(rt, wid, on="approval"))
        assert await client.signal(wid, "approval", "ok") is True
        assert await _finish(rt, wid) == ["ord-7", "ok"]
    assert probe.results("asker", "ask:Which order?") == ["ord-7", "ord-7"]
    transcript = await fetch(
        rt,
        """SELECT m.role, m.content FROM messages m JOIN workflows w ON w.session_id = m.session_id
           WHERE w.id = $1 AND m.content IN ('Which order?', 'ord-7') ORDER BY m.id""",
        wid,
    )
    assert [(m["role"], m["content"]) for m in transcript] == [
        ("agent", "Which order?"),
        ("customer", "ord-7"),
    ]


async def test_ask_times_out_without_a_reply(rt: Runtime, probe: Probe) -> None:
    async with worker(rt):
        wid = await Client(rt).submit("script", Plan(name="mute", script=["ask:Anyone?:0.3"]))
        assert await _finish(rt, wid) == ["timed out"]
    assert probe.runs["mute"] == 2


async def test_a_signal_sent_after_the_deadline_does_not_undo_the_timeout(
    rt: Runtime, probe: Probe
) -> None:
    """The timer woke the step (queued, not run yet) when the signal comes: too late."""
    client = Client(rt)
    wid = await client.submit("script", Plan(name="edge", script=["wait:approval:30"]))
    async with worker(rt):
        await _until(lambda: _parked(rt, wid, on="approval"))
    async with rt.db() as conn:  # the deadline passes while no worker runs
        await conn.execute(
            """UPDATE steps SET not_before = now() - interval '1 second',
                                waits = jsonb_build_array(extract(epoch FROM now()) - 1)
               WHERE workflow_id = $1""",
            wid,
        )
    assert await timers.wake_due(rt) == 1
    assert await client.signal(wid, "approval", "late") is False  # nobody waits: kept
    async with worker(rt):
        assert await _finish(rt, wid) == ["timed out"]
    assert await _signals(rt, wid) == [("approval", "late", None)]  # still there, untaken


async def test_a_signal_sent_while_the_step_parks_is_not_lost(rt: Runtime, probe: Probe) -> None:
    """The signal arrives after the wait checked for it and before its park committed.

    A transaction holding the workflow row stops the park just before its commit (its
    last statement updates that row); the signal is sent then, and the row released.
    The signal must wake the step (sending waits for the park), not be kept while the
    step parks for good.
    """
    client = Client(rt)
    wid = await client.submit("script", Plan(name="race", script=["wait:approval"]))
    woke: list[bool] = []

    async def send() -> None:
        woke.append(await client.signal(wid, "approval", "yes"))

    async with rt.pool.acquire() as holder:
        holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM workflows WHERE id = $1 FOR NO KEY UPDATE", wid)
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await tx.commit()  # wrote nothing: only lets the park go on

        async with worker(rt):
            try:
                parking = await _blocked_by(rt, holder_pid)  # the park, stopped at its end
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send)
                    try:
                        # Sent: returned already, or waiting for the park to commit.
                        await _until(lambda: bool(woke) or _blocks(rt, parking))
                    finally:
                        await release()
            finally:
                await release()
            assert await _finish(rt, wid) == ["yes"]
    assert woke == [True]  # it found the step parked and woke it
    assert probe.runs["race"] == 2


async def _blocked_by(rt: Runtime, pid: int) -> int:
    """The backend blocked by ``pid`` (waited for; a hang guard)."""
    found: list[int] = []

    async def check() -> bool:
        rows = await fetch(
            rt, "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        )
        found.extend(r["pid"] for r in rows)
        return bool(rows)

    await _until(check)
    return found[0]


async def _blocks(rt: Runtime, pid: int) -> bool:
    rows = await fetch(
        rt, "SELECT 1 FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
    )
    return bool(rows)


async def test_signals_to_a_finished_or_unknown_workflow_are_refused(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    async with worker(rt):
        wid = await client.submit("script", Plan(name="done", script=[]))
        assert await _finish(rt, wid) == []
    with pytest.raises(InvalidInput, match="is completed; it takes no signals"):
        await client.signal(wid, "approval", "late")
    with pytest.raises(InvalidInput, match="is completed"):
        await client.provide_input(wid, "late")
    with pytest.raises(InvalidInput, match="needs a name"):
        await client.signal(wid, " ", None)
    with pytest.raises(WorkflowNotFound):
        await client.signal(uuid4(), "approval", None)
    assert await _signals(rt, wid) == []
