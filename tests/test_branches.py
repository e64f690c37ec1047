"""Parallel branches, joins and the step limit, end to end on real Redis and Postgres.

Every agent reports its runs into a ``Probe`` owned by the test, so counts are taken
outside the runtime; gates hold chosen branches to fix an interleaving (which branch
ends first, or every branch ending at the same moment). No timing is asserted.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from uuid import UUID

import anyio
import pytest
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.errors import AgentError, InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio

BRANCHES = ("b0", "b1", "b2")
# Client.wait checks Postgres every ``poll`` seconds and, as written, waits out one
# interval even when everything it waits for has ended: keep the interval short.
POLL = 0.05


class Job(BaseModel):
    """The pipeline input (any model): which branches to fork, which fail, which join."""

    name: str
    branches: list[str]
    fail: list[str] = []
    join: str = "join"


class JobIn(AgentInput):
    input: Job


class Anything(AgentInput):
    pass


class Out(AgentOutput):
    value: str


class Probe:
    """What the agents did, recorded outside the runtime."""

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []  # (job name, agent), one per execution
        self.seen: dict[str, list[dict[str, Any]]] = {}  # job -> each state a join saw
        self.gates: dict[str, anyio.Event] = {}  # agent -> a gate it waits at
        self.loop = Counter[str]()

    def ran(self, job: str, agent: str) -> int:
        return self.runs.count((job, agent))


def _branch(probe: Probe, agent_name: str) -> type[Agent[JobIn, Out]]:
    class Branch(Agent[JobIn, Out]):
        name = agent_name
        input_model = JobIn
        output_model = Out
        then = "join"

        async def run(self, ctx: StepContext, data: JobIn) -> Out:
            job = data.input
            probe.runs.append((job.name, self.name))
            gate = probe.gates.get(self.name)
            if gate is not None:
                await gate.wait()
            if self.name in job.fail:
                raise AgentError(f"{self.name} refuses", non_retryable=True)
            self.then = job.join
            return Out(value=f"{job.name}/{self.name}")

        def route(self, output: Out) -> Sequence[str]:
            return [self.then]

    return Branch


def build_app(probe: Probe) -> App:
    app = App("branches-test", version="test")

    @app.agent
    class Fork(Agent[JobIn, Out]):
        name = "fork"
        input_model = JobIn
        output_model = Out
        routes = BRANCHES
        to: tuple[str, ...] = ()

        async def run(self, ctx: StepContext, data: JobIn) -> Out:
            probe.runs.append((data.input.name, self.name))
            self.to = tuple(data.input.branches)
            return Out(value="forked")

        def route(self, output: Out) -> Sequence[str]:
            return self.to

    for agent in BRANCHES:
        app.agent(_branch(probe, agent))

    @app.agent
    class Join(Agent[JobIn, Out]):
        name = "join"
        input_model = JobIn
        output_model = Out
        join = True

        async def run(self, ctx: StepContext, data: JobIn) -> Out:
            probe.runs.append((data.input.name, self.name))
            probe.seen.setdefault(data.input.name, []).append(dict(ctx.state))
            merged = sorted(k for k in ctx.state if k in BRANCHES)
            return Out(value=",".join(merged))

    @app.agent
    class OptionalJoin(Join):
        name = "ojoin"
        optional_branches = True

    @app.agent
    class Ping(Agent[Anything, Out]):
        name = "ping"
        input_model = Anything
        output_model = Out

        async def run(self, ctx: StepContext, data: Anything) -> Out:
            probe.loop[self.name] += 1
            return Out(value=self.name)

        def route(self, output: Out) -> Sequence[str]:
            return ["pong"]

    @app.agent
    class Pong(Ping):
        name = "pong"

        def route(self, output: Out) -> Sequence[str]:
            return ["ping"]

    app.pipeline("fan", ["fork", "join"], input_model=Job)
    app.pipeline("ofan", ["fork", "ojoin"], input_model=Job)
    app.pipeline("loop", ["ping", "pong"], max_steps=7)
    app.pipeline("loop_default", ["ping", "pong"])
    app.validate()
    return app


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(probe)) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def workers(rt: Runtime, count: int = 1, concurrency: int = 4) -> AsyncIterator[None]:
    """``count`` workers running for the block (reconciler off: nothing is lost here)."""
    started = [Worker(rt, concurrency=concurrency, reconcile=False) for _ in range(count)]
    async with anyio.create_task_group() as tg:
        for worker in started:
            tg.start_soon(worker.run)
        try:
            yield
        finally:
            for worker in started:
                worker.stop()


async def _until(check: Callable[[], Any], timeout: float = 15.0) -> None:
    """Poll ``check`` (sync or async) until it is true; a hang guard, not a timing assert."""
    with anyio.fail_after(timeout):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await anyio.sleep(0.02)


async def _steps(rt: Runtime, wid: UUID) -> list[tuple[int, str, str]]:
    rows = await fetch(
        rt, "SELECT seq, agent, status FROM steps WHERE workflow_id = $1 ORDER BY seq", wid
    )
    return [(r["seq"], r["agent"], r["status"]) for r in rows]


async def _events(rt: Runtime, wid: UUID, kind: str) -> int:
    rows = await fetch(
        rt, "SELECT count(*) AS n FROM events WHERE workflow_id = $1 AND type = $2", wid, kind
    )
    return int(rows[0]["n"])


async def _assert_joined_once(rt: Runtime, probe: Probe, wid: UUID, job: Job) -> None:
    """Every branch ran once, then the join once, on every branch's output."""
    assert probe.ran(job.name, "fork") == 1
    for agent in job.branches:
        assert probe.ran(job.name, agent) == 1, agent
    assert probe.ran(job.name, job.join) == 1
    [state] = probe.seen[job.name]
    for agent in job.branches:
        assert state[agent] == {"value": f"{job.name}/{agent}"}
    record = await Client(rt).get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    assert record.state[job.join] == {"value": ",".join(sorted(job.branches))}
    steps = await _steps(rt, wid)
    # fork, each branch, the join: one step each, numbered 0..n without a gap or a repeat.
    assert [s[0] for s in steps] == list(range(len(job.branches) + 2))
    assert sorted(s[1] for s in steps) == sorted(["fork", *job.branches, job.join])
    assert steps[-1][1] == job.join
    assert {s[2] for s in steps} == {"completed"}
    assert await _events(rt, wid, "workflow.forked") == 1
    assert await _events(rt, wid, "workflow.join_started") == 1
    assert await _events(rt, wid, "workflow.completed") == 1


async def test_fork_into_two_and_three_branches_then_join_once(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    two = Job(name="two", branches=["b0", "b1"])
    three = Job(name="three", branches=["b0", "b1", "b2"])
    async with workers(rt, concurrency=4):
        wid_two = await client.submit("fan", two, tenant="acme", session="s-two", key="k-two")
        wid_three = await client.submit("fan", three.model_dump(), tenant="acme", key="k-three")
        # The idempotency key returns the workflow the first submission created.
        assert await client.submit("fan", two, tenant="acme", session="s-two", key="k-two") == (
            wid_two
        )
        statuses = await client.wait([wid_two, wid_three], timeout=15, poll=POLL)
    assert statuses == {wid_two: WorkflowStatus.COMPLETED, wid_three: WorkflowStatus.COMPLETED}
    await _assert_joined_once(rt, probe, wid_two, two)
    await _assert_joined_once(rt, probe, wid_three, three)
    record = await client.get(wid_two)
    assert (record.tenant_id, record.session_id) == ("acme", "s-two")
    assert record.state["input"] == two.model_dump()  # the pipeline's input_key
    with pytest.raises(InvalidInput, match="does not fit Job"):
        await client.submit("fan", {"name": "no branches"})


async def test_join_runs_once_when_branches_end_at_the_same_moment(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    gate = anyio.Event()
    probe.gates = {agent: gate for agent in BRANCHES}
    jobs = [Job(name=f"w{i}", branches=list(BRANCHES)) for i in range(4)]
    async with workers(rt, count=2, concurrency=4):
        wids = [await client.submit("fan", job) for job in jobs]
        # Every branch of every workflow is running, held at the gate...
        await _until(lambda: len(probe.runs) == len(jobs) * 4)
        gate.set()  # ...and all of them end together: the joins race in each workflow.
        statuses = await client.wait(wids, timeout=15, poll=POLL)
    assert set(statuses.values()) == {WorkflowStatus.COMPLETED}
    for wid, job in zip(wids, jobs, strict=True):
        await _assert_joined_once(rt, probe, wid, job)
    duplicates = await fetch(
        rt,
        "SELECT workflow_id, seq FROM steps GROUP BY workflow_id, seq HAVING count(*) > 1",
    )
    assert duplicates == []
    open_counts = await fetch(rt, "SELECT open_steps, join_step FROM workflows")
    assert {(r["open_steps"], r["join_step"]) for r in open_counts} == {(0, None)}


async def _started_held(rt: Runtime, probe: Probe, pipeline: str, job: Job) -> UUID:
    """Submit ``job`` with every branch held at a gate; return once all of them run.

    (A branch not yet started when another fails the workflow never starts at all.)
    """
    probe.gates = {agent: anyio.Event() for agent in job.branches}
    wid = await Client(rt).submit(pipeline, job)
    await _until(lambda: all(probe.ran(job.name, agent) == 1 for agent in job.branches))
    return wid


async def _end_b1(rt: Runtime, probe: Probe, wid: UUID, job: Job, failing: str) -> None:
    """Let b1 (which fails) end first or last; then the others."""
    others = ("b0", "b2")
    if failing == "first":
        probe.gates["b1"].set()
        await _until(lambda: _agents_with(rt, wid, "failed", lambda s: s == {"b1"}))
        for agent in others:
            probe.gates[agent].set()
    else:
        for agent in others:
            probe.gates[agent].set()
        # Both reached the join: it is pending when b1 fails.
        await _until(lambda: _agents_with(rt, wid, "completed", lambda s: s == {"fork", *others}))
        assert [s for s in await _steps(rt, wid) if s[1] != "b1"][-1] == (4, job.join, "pending")
        probe.gates["b1"].set()


@pytest.mark.parametrize("failing", ["first", "last"])
async def test_a_failed_branch_fails_the_workflow_and_the_join_never_runs(
    rt: Runtime, probe: Probe, failing: str
) -> None:
    """The failing branch ends before the others (no join yet), or after both others
    reached the join (the join is pending): either way the join never runs."""
    client = Client(rt)
    job = Job(name="failing", branches=list(BRANCHES), fail=["b1"])
    async with workers(rt, concurrency=4):
        wid = await _started_held(rt, probe, "fan", job)
        await _end_b1(rt, probe, wid, job, failing)
        # Every branch has ended (b0 and b2 complete into a failed workflow, if last).
        await _until(lambda: _agents_with(rt, wid, "completed", lambda s: {"b0", "b2"} <= s))
        statuses = await client.wait([wid], timeout=15, poll=POLL)
    assert statuses[wid] is WorkflowStatus.FAILED
    record = await client.get(wid)
    assert record.error is not None and "b1 refuses" in record.error
    assert probe.ran("failing", "join") == 0
    assert "failing" not in probe.seen
    # The branches that reached it left the join pending (a resume of b1 would run it).
    assert [s for s in await _steps(rt, wid) if s[1] == "join"] == [(4, "join", "pending")]


@pytest.mark.parametrize("failing", ["first", "last"])
async def test_optional_branches_join_runs_once_with_the_branch_error(
    rt: Runtime, probe: Probe, failing: str
) -> None:
    client = Client(rt)
    job = Job(name="optional", branches=list(BRANCHES), fail=["b1"], join="ojoin")
    async with workers(rt, concurrency=4):
        wid = await _started_held(rt, probe, "ofan", job)
        await _end_b1(rt, probe, wid, job, failing)
        statuses = await client.wait([wid], timeout=15, poll=POLL)
    assert statuses[wid] is WorkflowStatus.COMPLETED
    assert probe.ran("optional", "ojoin") == 1
    [state] = probe.seen["optional"]
    assert "b1" not in state
    assert state["b0"] == {"value": "optional/b0"} and state["b2"] == {"value": "optional/b2"}
    assert list(state["branch_errors"]) == ["b1"]
    assert "b1 refuses" in state["branch_errors"]["b1"]
    assert (await client.get(wid)).state["ojoin"] == {"value": "b0,b2"}
    steps = await _steps(rt, wid)
    assert [s[0] for s in steps] == [0, 1, 2, 3, 4]
    assert [(s[1], s[2]) for s in steps if s[2] != "completed"] == [("b1", "failed")]
    assert await _events(rt, wid, "step.branch_failed") == 1
    assert await _events(rt, wid, "workflow.failed") == 0


async def test_a_routing_loop_fails_with_step_limit_reached_after_exactly_max_steps(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    async with workers(rt, concurrency=1):
        wid = await client.submit("loop", {"any": "json"})
        statuses = await client.wait([wid], timeout=15, poll=POLL)
    assert statuses[wid] is WorkflowStatus.FAILED
    record = await client.get(wid)
    assert record.error is not None
    assert "StepLimitReached" in record.error and "step limit" in record.error
    steps = await _steps(rt, wid)
    assert [s[0] for s in steps] == list(range(7))
    assert [s[1] for s in steps] == ["ping", "pong"] * 3 + ["ping"]
    assert [s[2] for s in steps] == ["completed"] * 6 + ["failed"]
    assert probe.loop == Counter(ping=4, pong=3)  # non-retryable: the 7th ran once


async def test_the_max_steps_setting_bounds_pipelines_without_their_own(
    settings: Settings, probe: Probe
) -> None:
    tight = settings.model_copy(update={"max_steps": 4})
    async with runtime_for(tight, build_app(probe)) as rt:
        client = Client(rt)
        async with workers(rt, concurrency=1):
            wid = await client.submit("loop_default", {})
            statuses = await client.wait([wid], timeout=15, poll=POLL)
        assert statuses[wid] is WorkflowStatus.FAILED
        assert "step limit" in ((await client.get(wid)).error or "")
        assert [s[2] for s in await _steps(rt, wid)] == ["completed"] * 3 + ["failed"]


# Helpers polled by _until --------------------------------------------------------------


async def _status_is(client: Client, wid: UUID, status: WorkflowStatus) -> bool:
    return (await client.get(wid)).status is status


async def _agents_with(
    rt: Runtime, wid: UUID, status: str, check: Callable[[set[str]], bool]
) -> bool:
    rows = await fetch(
        rt, "SELECT agent FROM steps WHERE workflow_id = $1 AND status = $2", wid, status
    )
    return check({r["agent"] for r in rows})


async def test_resume_after_a_failed_branch_runs_the_join_once(rt: Runtime, probe: Probe) -> None:
    """A sibling that completes while the workflow is failed is not lost: resuming the
    failed branch ends the fork and runs the join once, on every branch's output."""
    client = Client(rt)
    job = Job(name="resumed", branches=["b0", "b1"], fail=["b1"])
    async with workers(rt, concurrency=4):
        wid = await _started_held(rt, probe, "fan", job)
        probe.gates["b1"].set()
        await _until(lambda: _status_is(client, wid, WorkflowStatus.FAILED))
        probe.gates["b0"].set()  # b0 ends into the failed workflow
        await _until(lambda: _agents_with(rt, wid, "completed", lambda s: "b0" in s))
        # Fixed (b1 no longer fails): resume re-runs b1, which ends the fork.
        async with rt.db() as conn:
            await conn.execute(
                "UPDATE steps SET input = jsonb_set(input, '{input,fail}', '[]')"
                " WHERE workflow_id = $1 AND agent = 'b1'",
                wid,
            )
        assert await client.resume(wid) == 1
        statuses = await client.wait([wid], timeout=15, poll=POLL)
    assert statuses[wid] is WorkflowStatus.COMPLETED
    assert probe.ran("resumed", "b0") == 1 and probe.ran("resumed", "b1") == 2
    assert probe.ran("resumed", "join") == 1
    [state] = probe.seen["resumed"]
    assert state["b0"] == {"value": "resumed/b0"} and state["b1"] == {"value": "resumed/b1"}
