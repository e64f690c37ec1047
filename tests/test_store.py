"""The store's own suite: each named operation of ``Store`` against real Postgres.

No worker and no Redis stream: the tests build submissions, envelopes and outcomes
themselves and call the store as the engine would, then read the rows back. Races
(two completions of one step, the last two branches of a fork, two timer wakers)
run as concurrent tasks on separate pooled connections.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import anyio
import asyncpg
import pytest

from orchestrator.errors import FenceRejected, InvalidInput, Parked, WorkflowNotFound
from orchestrator.runtime import Runtime
from orchestrator.schemas import TaskEnvelope, WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.store import steps, waits, workflows
from orchestrator.store.operations import Store
from tests.apps import Probe, build_app
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio

JOIN = frozenset({"j"})


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(Probe())) as runtime:
        yield runtime


@pytest.fixture
def store(rt: Runtime) -> Store:
    return Store(rt.db)


def submission(
    *, session: str | None = None, key: str | None = None, tenant: str = "t1"
) -> workflows.Submission:
    return workflows.Submission(
        pipeline="p",
        first_agent="a",
        state={"ticket": {"subject": "hello"}},
        message="hello",
        tenant=tenant,
        session=session,
        customer="c1",
        app_version="test",
        key=key,
    )


async def start(store: Store, **kwargs: Any) -> TaskEnvelope:
    """A new running workflow; its first step's envelope."""
    created = await store.submit(submission(**kwargs))
    assert not created.queued
    return created.envelope


def outcome(envelope: TaskEnvelope, next_agents: Sequence[str] = (), **state: Any) -> steps.Outcome:
    return steps.Outcome(
        output={"by": envelope.agent, "attempt": envelope.attempt},
        state={**envelope.payload, envelope.agent: envelope.seq, **state},
        next_agents=tuple(next_agents),
        tool_runs=[],
        messages=[f"{envelope.agent} says hi"],
        worker="test-worker",
        started_at=datetime.now(UTC),
    )


async def finish(
    store: Store,
    envelope: TaskEnvelope,
    next_agents: Sequence[str] = (),
    joins: frozenset[str] = frozenset(),
) -> steps.Completed:
    """Open the step and complete it, as a worker would."""
    opened = await store.open(envelope)
    assert opened.runnable, opened.reason
    return await store.complete(envelope, outcome(envelope, next_agents), opened, joins)


async def fail(
    store: Store, envelope: TaskEnvelope, *, retry_after: float | None, tolerated: bool = False
) -> steps.Failure:
    """Fail the step; ``tolerated``: the pipeline's join "j" declares optional branches."""
    return await store.fail(
        envelope,
        error="boom",
        retry_after=retry_after,
        recorded=[],
        worker="test-worker",
        started_at=datetime.now(UTC),
        usage=steps.ModelUse(),
        optional_join="j" if tolerated else None,
    )


async def park(store: Store, envelope: TaskEnvelope, parked: Parked) -> waits.Parking:
    return await store.park(
        envelope,
        parked,
        ordinal=0,
        recorded=[],
        worker="test-worker",
        started_at=datetime.now(UTC),
        usage=steps.ModelUse(),
    )


async def complete_into(
    results: list[str], store: Store, env: TaskEnvelope, opened: steps.OpenStep, agent: str
) -> None:
    """Complete the step handing to ``agent``; record the agent, or "rejected"."""
    try:
        await store.complete(env, outcome(env, [agent]), opened, frozenset())
        results.append(agent)
    except FenceRejected:
        results.append("rejected")


async def end_at_join(
    handed: list[list[TaskEnvelope]], store: Store, branch: TaskEnvelope, opened: steps.OpenStep
) -> None:
    """Complete a branch routing to the join; record what it handed on."""
    done = await store.complete(branch, outcome(branch, ["j"]), opened, JOIN)
    handed.append(done.next)


async def one(rt: Runtime, sql: str, *args: Any) -> Any:
    rows = await fetch(rt, sql, *args)
    assert len(rows) == 1, rows
    return rows[0]


async def step_row(rt: Runtime, step_id: UUID) -> Any:
    return await one(rt, "SELECT * FROM steps WHERE id = $1", step_id)


async def workflow_row(rt: Runtime, workflow_id: UUID) -> Any:
    return await one(rt, "SELECT * FROM workflows WHERE id = $1", workflow_id)


async def event_types(rt: Runtime, workflow_id: UUID) -> list[str]:
    rows = await fetch(
        rt, "SELECT type FROM events WHERE workflow_id = $1 ORDER BY id", workflow_id
    )
    return [r["type"] for r in rows]


async def counts(rt: Runtime, workflow_id: UUID) -> dict[str, int]:
    """How many rows of each kind the workflow has: what a rejected write must not add."""
    result = {}
    for table in ("steps", "checkpoints", "events", "messages", "tool_runs"):
        row = await one(
            rt, f"SELECT count(*) AS n FROM {table} WHERE workflow_id = $1", workflow_id
        )
        result[table] = row["n"]
    attempts = await one(
        rt,
        "SELECT count(*) AS n FROM step_attempts a JOIN steps s ON s.id = a.step_id "
        "WHERE s.workflow_id = $1",
        workflow_id,
    )
    result["step_attempts"] = attempts["n"]
    return result


# Workflows: submit


async def test_submit_records_a_running_workflow_and_its_first_step(
    rt: Runtime, store: Store
) -> None:
    created = await store.submit(submission())
    env = created.envelope
    assert not created.queued and not created.existing
    assert (env.seq, env.agent, env.attempt, env.assigned_by) == (0, "a", 1, "submit")
    step = await step_row(rt, env.step_id)
    assert (step["status"], step["seq"], step["attempt"]) == ("queued", 0, 1)
    assert (await workflow_row(rt, env.workflow_id))["status"] == "running"
    assert await event_types(rt, env.workflow_id) == ["workflow.submitted"]
    assert (await store.open(env)).runnable


async def test_submit_with_a_key_is_idempotent(rt: Runtime, store: Store) -> None:
    first = await store.submit(submission(key="k-1"))
    again = await store.submit(submission(key="k-1"))
    assert again.existing and again.envelope.workflow_id == first.envelope.workflow_id
    assert again.queued  # nothing to enqueue: the first submission's step is the one
    assert len(await fetch(rt, "SELECT id FROM workflows")) == 1
    assert len(await fetch(rt, "SELECT id FROM steps")) == 1
    # The key is per tenant: another tenant's submission with it is a workflow of its own.
    other = await store.submit(submission(key="k-1", tenant="t2"))
    assert not other.existing and other.envelope.workflow_id != first.envelope.workflow_id


async def test_submit_queues_a_second_workflow_of_the_same_session(
    rt: Runtime, store: Store
) -> None:
    first = await store.submit(submission(session="s1"))
    second = await store.submit(submission(session="s1"))
    assert not first.queued and second.queued and not second.existing
    assert (await workflow_row(rt, second.envelope.workflow_id))["status"] == "queued"
    # A queued workflow's step is not runnable until the session frees up.
    assert not (await store.open(second.envelope)).runnable

    done = await finish(store, first.envelope)
    assert done.status is WorkflowStatus.COMPLETED
    assert [e.step_id for e in done.next] == [second.envelope.step_id]  # promoted, in order
    assert (await workflow_row(rt, second.envelope.workflow_id))["status"] == "running"
    assert (await store.open(second.envelope)).runnable


async def test_submit_to_another_tenants_session_is_refused(store: Store) -> None:
    await store.submit(submission(session="s1", tenant="t1"))
    with pytest.raises(InvalidInput):
        await store.submit(submission(session="s1", tenant="t2"))


# Steps: open and complete


async def test_open_refuses_unknown_stale_closed_and_stopped_steps(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    unknown = env.model_copy(update={"step_id": uuid4()})
    assert (await store.open(unknown)).reason == "unknown step"
    ahead = await store.open(env.model_copy(update={"attempt": 2}))
    assert not ahead.runnable and ahead.reason.startswith("stale attempt 2")

    newer = await store.requeue(env.step_id, reason="test")
    assert newer is not None and newer.attempt == 2
    stale = await store.open(env)
    assert not stale.runnable and stale.reason == "stale attempt 1 (step at 2)"

    await finish(store, newer, ["b"])
    closed = await store.open(newer)
    assert not closed.runnable and closed.reason == "step completed"

    other = await start(store)
    await store.cancel(other.workflow_id)
    cancelled = await store.open(other)
    assert not cancelled.runnable and cancelled.reason == "workflow cancelled"


async def test_complete_at_an_old_attempt_is_fenced_and_writes_nothing(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    opened = await store.open(env)
    assert opened.runnable
    assert await store.requeue(env.step_id, reason="lease expired") is not None
    before = await counts(rt, env.workflow_id)
    wf_before = await workflow_row(rt, env.workflow_id)

    for next_agents in [("b",), (), ("b", "c")]:  # a handoff, an end, a fork
        with pytest.raises(FenceRejected):
            await store.complete(env, outcome(env, next_agents), opened, frozenset())

    assert await counts(rt, env.workflow_id) == before  # no checkpoint, step, event...
    wf = await workflow_row(rt, env.workflow_id)
    for column in ("status", "state", "next_seq", "open_steps", "join_step", "updated_at"):
        assert wf[column] == wf_before[column], column
    step = await step_row(rt, env.step_id)
    assert (step["status"], step["attempt"], step["output"]) == ("queued", 2, None)


async def test_concurrent_completions_of_one_step_exactly_one_wins(
    rt: Runtime, store: Store
) -> None:
    for _ in range(10):
        env = await start(store)
        opened = await store.open(env)
        results: list[str] = []
        async with anyio.create_task_group() as tg:
            for agent in ("b", "c"):
                tg.start_soon(complete_into, results, store, env, opened, agent)
        assert sorted(results)[-1] == "rejected" and len(results) == 2, results
        [winner] = [r for r in results if r != "rejected"]
        rows = await fetch(
            rt, "SELECT seq, agent FROM steps WHERE workflow_id = $1 ORDER BY seq", env.workflow_id
        )
        assert [(r["seq"], r["agent"]) for r in rows] == [(0, "a"), (1, winner)]
        n = await counts(rt, env.workflow_id)
        assert (n["checkpoints"], n["step_attempts"]) == (1, 1)
        assert (await event_types(rt, env.workflow_id)).count("step.completed") == 1


async def test_concurrent_completions_share_one_commit_and_a_bad_one_fails_alone(
    rt: Runtime, store: Store
) -> None:
    started = [await start(store) for _ in range(7)]
    opened = [await store.open(env) for env in started]
    results: dict[int, str] = {}

    async def complete(i: int, env: TaskEnvelope, open_: steps.OpenStep) -> None:
        done = outcome(env, ["b"])
        if i == 5:  # Postgres refuses a NUL in jsonb: this completion's own error
            done = dataclasses.replace(done, output={"text": "\x00"})
        try:
            await store.complete(env, done, open_, frozenset())
            results[i] = "completed"
        except asyncpg.PostgresError as exc:
            results[i] = type(exc).__name__

    for batch in (range(4), range(4, 7)):  # all good, then one bad among good ones
        async with anyio.create_task_group() as tg:
            for i in batch:
                tg.start_soon(complete, i, started[i], opened[i])
    assert results.pop(5) == "UntranslatableCharacterError"
    assert set(results.values()) == {"completed"}
    ids = [env.workflow_id for env in started]
    rows = await fetch(
        rt,
        "SELECT workflow_id, status, xmin::text AS tx FROM steps WHERE workflow_id = ANY($1)"
        " AND seq = 0",
        ids,
    )
    status = {r["workflow_id"]: r["status"] for r in rows}
    assert status.pop(ids[5]) == "queued"  # nothing of the bad one was written
    assert set(status.values()) == {"completed"}
    # Made together, four completions committed in two transactions: the first alone,
    # the three that came while it was in flight together.
    assert len({r["tx"] for r in rows if r["workflow_id"] in ids[:4]}) == 2
    handed = await fetch(
        rt, "SELECT count(*) AS n FROM steps WHERE workflow_id = ANY($1) AND seq = 1", ids
    )
    assert handed[0]["n"] == 6


async def test_complete_alone_hands_off_to_the_next_step_with_the_next_seq(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    done = await finish(store, env, ["b"])
    assert done.status is WorkflowStatus.RUNNING
    [nxt] = done.next
    assert (nxt.seq, nxt.agent, nxt.attempt, nxt.assigned_by) == (1, "b", 1, "a")
    assert nxt.workflow_id == env.workflow_id and nxt.payload["a"] == 0
    step = await step_row(rt, nxt.step_id)
    assert (step["status"], step["seq"], step["agent"]) == ("queued", 1, "b")
    wf = await workflow_row(rt, env.workflow_id)
    assert (wf["next_seq"], wf["open_steps"], wf["state"]["a"]) == (2, 1, 0)
    checkpoint = await one(rt, "SELECT seq, agent FROM checkpoints")
    assert (checkpoint["seq"], checkpoint["agent"]) == (0, "a")
    opened = await store.open(nxt)
    assert opened.runnable and opened.alone and opened.next_seq == 2

    third = (await finish(store, nxt, ["c"])).next[0]
    assert third.seq == 2
    last = await finish(store, third)
    assert last.status is WorkflowStatus.COMPLETED and last.next == []
    wf = await workflow_row(rt, env.workflow_id)
    assert wf["status"] == "completed" and wf["completed_at"] is not None
    assert (await event_types(rt, env.workflow_id))[-1] == "workflow.completed"


@pytest.mark.parametrize("agents", [("b", "c"), ("b", "c", "d")])
async def test_a_fork_creates_branches_with_distinct_seqs(
    rt: Runtime, store: Store, agents: tuple[str, ...]
) -> None:
    env = await start(store)
    opened = await store.open(env)
    assert opened.alone
    done = await store.complete(env, outcome(env, agents), opened, JOIN)
    assert done.status is WorkflowStatus.RUNNING
    assert [e.agent for e in done.next] == list(agents)
    assert sorted(e.seq for e in done.next) == list(range(1, len(agents) + 1))
    wf = await workflow_row(rt, env.workflow_id)
    assert (wf["open_steps"], wf["next_seq"]) == (len(agents), len(agents) + 1)
    assert "workflow.forked" in await event_types(rt, env.workflow_id)
    for branch in done.next:
        branch_open = await store.open(branch)
        assert branch_open.runnable and not branch_open.alone

    # Branches ending without a join: the last one completes the workflow, only it.
    for i, branch in enumerate(done.next):
        ended = await finish(store, branch)
        last = i == len(agents) - 1
        assert ended.status is (WorkflowStatus.COMPLETED if last else WorkflowStatus.RUNNING)
        assert ended.next == []


async def test_branches_reaching_a_join_create_one_pending_join_promoted_once(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    fork = await finish(store, env, ["b", "c", "d"], JOIN)
    b, c, d = fork.next
    for branch in (b, c):
        ended = await finish(store, branch, ["j"], JOIN)
        assert ended.next == [] and ended.status is WorkflowStatus.RUNNING
        [join] = await fetch(rt, "SELECT id, status, seq FROM steps WHERE agent = 'j'")
        assert (join["status"], join["seq"]) == ("pending", 4)
    wf = await workflow_row(rt, env.workflow_id)
    assert (wf["join_step"], wf["open_steps"]) == (join["id"], 1)

    last = await finish(store, d, ["j"], JOIN)
    [j] = last.next
    assert (j.step_id, j.agent, j.seq, j.attempt) == (join["id"], "j", 4, 1)
    assert {"b", "c", "d"} <= set(j.payload)  # the merged state of every branch
    assert (await step_row(rt, j.step_id))["status"] == "queued"
    wf = await workflow_row(rt, env.workflow_id)
    assert (wf["join_step"], wf["open_steps"], wf["next_seq"]) == (None, 1, 5)
    assert (await event_types(rt, env.workflow_id)).count("workflow.join_started") == 1

    # The join runs alone again: its handoff takes the workflow's next seq.
    opened = await store.open(j)
    assert opened.alone and opened.next_seq == 5
    after = await finish(store, j, ["k"])
    assert [(e.agent, e.seq) for e in after.next] == [("k", 5)]


async def test_the_last_branches_ending_together_promote_the_join_exactly_once(
    rt: Runtime, store: Store
) -> None:
    runs = 20
    for i in range(runs):
        env = await start(store)
        agents = ("b", "c") if i % 2 else ("b", "c", "d")
        branches = (await finish(store, env, agents, JOIN)).next
        if len(branches) == 3:  # the first branch creates the pending join beforehand
            await finish(store, branches[0], ["j"], JOIN)
        racing = branches[-2:]
        opened = [await store.open(branch) for branch in racing]
        handed: list[list[TaskEnvelope]] = []
        async with anyio.create_task_group() as tg:
            for branch, opened_step in zip(racing, opened, strict=True):
                tg.start_soon(end_at_join, handed, store, branch, opened_step)

        joins = await fetch(
            rt,
            "SELECT id, status FROM steps WHERE workflow_id = $1 AND agent = 'j'",
            env.workflow_id,
        )
        assert [r["status"] for r in joins] == ["queued"], (i, joins)
        assert sorted(len(h) for h in handed) == [0, 1], (i, handed)  # promoted by one only
        [promoted] = [e for h in handed for e in h]
        assert promoted.step_id == joins[0]["id"]
        wf = await workflow_row(rt, env.workflow_id)
        assert (wf["open_steps"], wf["join_step"], wf["status"]) == (1, None, "running")
        assert (await event_types(rt, env.workflow_id)).count("workflow.join_started") == 1


# Steps: failure


async def test_fail_with_retry_after_schedules_a_retry(rt: Runtime, store: Store) -> None:
    env = await start(store)
    failure = await fail(store, env, retry_after=30.0)
    assert failure.retry is not None and failure.delay == 30.0
    assert failure.retry.attempt == 2 and failure.retry.step_id == env.step_id
    step = await one(
        rt,
        "SELECT status, attempt, failures, error, "
        "extract(epoch FROM not_before - updated_at) AS wait FROM steps WHERE id = $1",
        env.step_id,
    )
    assert (step["status"], step["attempt"], step["failures"], step["error"]) == (
        "queued",
        2,
        1,
        "boom",
    )
    assert 29.9 <= float(step["wait"]) <= 30.1
    assert (await workflow_row(rt, env.workflow_id))["status"] == "running"
    retried = await one(rt, "SELECT data FROM events WHERE type = 'step.retried'")
    assert retried["data"]["retry_after"] == 30.0 and retried["data"]["attempt"] == 1
    attempt = await one(rt, "SELECT attempt, outcome, error FROM step_attempts")
    assert (attempt["attempt"], attempt["outcome"], attempt["error"]) == (1, "failed", "boom")
    assert await store.dead_letters(include_retried=True, limit=10) == []

    # Not due yet: nobody takes it over, the reconciler leaves it alone.
    assert await store.take_over(failure.retry, "another-worker") is None
    assert await store.stalled(older_than=0.0) == []
    assert (await store.open(failure.retry)).failures == 1
    with pytest.raises(FenceRejected):  # the failed attempt's fence is gone
        await fail(store, env, retry_after=30.0)


async def test_fail_without_retry_dead_letters_and_fails_the_workflow(
    rt: Runtime, store: Store
) -> None:
    env = await start(store, session="s1")
    behind = await store.submit(submission(session="s1"))
    failure = await fail(store, env, retry_after=None)
    assert failure.retry is None and failure.workflow_failed
    assert [e.step_id for e in failure.promoted] == [behind.envelope.step_id]
    assert (await step_row(rt, env.step_id))["status"] == "failed"
    wf = await workflow_row(rt, env.workflow_id)
    assert (wf["status"], wf["error"]) == ("failed", "a: boom")
    assert wf["completed_at"] is not None
    [letter] = await store.dead_letters(include_retried=False, limit=10)
    assert (letter.workflow_id, letter.step_id, letter.reason) == (
        env.workflow_id,
        env.step_id,
        "boom",
    )
    assert (await event_types(rt, env.workflow_id))[-3:] == [
        "step.failed",
        "step.dead_lettered",
        "workflow.failed",
    ]
    assert not (await store.open(env)).runnable


async def test_a_tolerated_branch_failure_ends_only_the_branch(rt: Runtime, store: Store) -> None:
    env = await start(store)
    b, c = (await finish(store, env, ["b", "c"], JOIN)).next
    await finish(store, c, ["j"], JOIN)
    failure = await fail(store, b, retry_after=None, tolerated=True)
    assert not failure.workflow_failed and failure.status is WorkflowStatus.RUNNING
    [j] = failure.promoted  # b was the last open branch: the join starts
    assert j.agent == "j" and j.payload["branch_errors"] == {"b": "boom"}
    assert (await step_row(rt, b.step_id))["status"] == "failed"
    wf = await workflow_row(rt, env.workflow_id)
    assert (wf["status"], wf["open_steps"], wf["join_step"]) == ("running", 1, None)
    assert await store.dead_letters(include_retried=True, limit=10) == []
    types = await event_types(rt, env.workflow_id)
    assert "step.branch_failed" in types and "workflow.failed" not in types


@pytest.mark.parametrize("branched", [True, False])
async def test_an_untolerated_or_unbranched_failure_fails_the_workflow(
    rt: Runtime, store: Store, branched: bool
) -> None:
    env = await start(store)
    if branched:
        env, sibling = (await finish(store, env, ["b", "c"], JOIN)).next
    failure = await fail(store, env, retry_after=None, tolerated=not branched)
    assert failure.workflow_failed and failure.status is WorkflowStatus.FAILED
    assert (await workflow_row(rt, env.workflow_id))["status"] == "failed"
    assert len(await store.dead_letters(include_retried=False, limit=10)) == 1
    if branched:  # the sibling branch stops: it is not runnable any more
        assert not (await store.open(sibling)).runnable


# Waits: park, signal, timers


async def test_park_on_a_signal_with_none_pending_parks_and_a_signal_wakes_it(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    parking = await park(store, env, Parked(name="approve", delay=None))
    assert parking.rerun is None
    step = await step_row(rt, env.step_id)
    assert (step["status"], step["waiting_for"], step["not_before"]) == (
        "waiting",
        "approve",
        None,
    )
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.WAITING
    assert not (await store.open(env)).runnable
    assert await store.wake_due() == []  # no timer: only the signal wakes it

    assert await store.signal(env.workflow_id, "other", {"x": 1}) is None  # not its signal
    woken = await store.signal(env.workflow_id, "approve", {"ok": True})
    assert woken is not None and woken.step_id == env.step_id and woken.attempt == 2
    assert (await step_row(rt, env.step_id))["status"] == "queued"
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.RUNNING
    opened = await store.open(woken)
    assert opened.runnable and opened.signals == {0: ("approve", {"ok": True})}
    assert not (await store.open(env)).runnable  # the parked attempt's fence is gone


async def test_park_with_the_signal_already_there_reruns_at_once(rt: Runtime, store: Store) -> None:
    env = await start(store)
    assert await store.signal(env.workflow_id, "approve", "yes") is None  # kept
    kept = await one(rt, "SELECT step_id, payload FROM signals")
    assert (kept["step_id"], kept["payload"]) == (None, "yes")

    parking = await park(store, env, Parked(name="approve", delay=None))
    assert parking.rerun is not None and parking.rerun.attempt == 2
    assert (await step_row(rt, env.step_id))["status"] == "queued"
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.RUNNING
    opened = await store.open(parking.rerun)
    assert opened.runnable and opened.signals == {0: ("approve", "yes")}


async def test_a_signal_sent_before_any_wait_is_kept_for_one_wait(store: Store) -> None:
    env = await start(store)
    assert await store.signal(env.workflow_id, "approve", {"n": 1}) is None
    take = store.take_signal
    args = (env.workflow_id, env.step_id)
    assert await take(*args, 2, name="approve", ordinal=0, deadline=None) == (False, None)
    assert await take(*args, 1, name="approve", ordinal=0, deadline=None) == (True, {"n": 1})
    assert await take(*args, 1, name="approve", ordinal=1, deadline=None) == (False, None)


async def test_signals_to_a_finished_or_unknown_workflow_are_refused(store: Store) -> None:
    env = await start(store)
    await finish(store, env)
    with pytest.raises(InvalidInput):
        await store.signal(env.workflow_id, "approve", None)
    with pytest.raises(WorkflowNotFound):
        await store.signal(uuid4(), "approve", None)


async def test_wake_due_wakes_only_due_timers(rt: Runtime, store: Store) -> None:
    due, later, signal = await start(store), await start(store), await start(store)
    assert (await park(store, due, Parked(name=None, delay=0.0))).rerun is None
    await park(store, later, Parked(name=None, delay=3600.0))
    await park(store, signal, Parked(name="approve", delay=None))
    woken = await store.wake_due()
    assert [(e.step_id, e.attempt) for e in woken] == [(due.step_id, 2)]
    assert await store.workflow_status(due.workflow_id) is WorkflowStatus.RUNNING
    for waiting in (later, signal):
        assert (await step_row(rt, waiting.step_id))["status"] == "waiting"
        assert await store.workflow_status(waiting.workflow_id) is WorkflowStatus.WAITING
    assert await store.wake_due() == []
    assert (await event_types(rt, due.workflow_id))[-1] == "step.woken"


async def test_concurrent_wake_due_never_wakes_a_step_twice(rt: Runtime, store: Store) -> None:
    parked = [await start(store) for _ in range(20)]
    for env in parked:
        await park(store, env, Parked(name=None, delay=0.0))
    woken: list[TaskEnvelope] = []

    async def wake() -> None:
        woken.extend(await store.wake_due(limit=100))

    # Hold the workflow rows, so the first waker stops mid-statement holding the due steps
    # while the others run into them: a lock-free waker would wake them a second time.
    async with rt.pool.acquire() as holder:
        held = holder.transaction()
        await held.start()
        await holder.execute("SELECT id FROM workflows FOR UPDATE")
        async with anyio.create_task_group() as tg:
            tg.start_soon(wake)
            await anyio.sleep(0.2)
            for _ in range(3):
                tg.start_soon(wake)
            await anyio.sleep(0.2)
            await held.rollback()
    assert Counter(e.step_id for e in woken) == Counter(e.step_id for e in parked)
    rows = await fetch(rt, "SELECT status, attempt FROM steps")
    assert {(r["status"], r["attempt"]) for r in rows} == {("queued", 2)}
    assert len(await fetch(rt, "SELECT id FROM events WHERE type = 'step.woken'")) == 20
    assert await store.wake_due() == []


# Recovery: requeue, cancel, resume, heartbeat


async def test_requeue_with_seen_attempt_only_moves_the_fence_from_that_attempt(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    assert await store.requeue(env.step_id, reason="r", seen_attempt=2) is None
    assert (await step_row(rt, env.step_id))["attempt"] == 1
    moved = await store.requeue(env.step_id, reason="r", seen_attempt=1)
    assert moved is not None and moved.attempt == 2 and moved.step_id == env.step_id
    assert await store.requeue(env.step_id, reason="r", seen_attempt=1) is None  # seen, moved
    again = await store.requeue(env.step_id, reason="r")  # no seen attempt: whatever it is
    assert again is not None and again.attempt == 3
    assert (await step_row(rt, env.step_id))["attempt"] == 3
    assert (await event_types(rt, env.workflow_id)).count("step.requeued") == 2

    await finish(store, again)
    assert await store.requeue(env.step_id, reason="r") is None  # closed: nothing to move


async def test_cancel_stops_open_steps_and_a_later_completion_is_refused(
    rt: Runtime, store: Store
) -> None:
    env = await start(store, session="s1")
    behind = await store.submit(submission(session="s1"))
    b, c = (await finish(store, env, ["b", "c"])).next
    opened = await store.open(b)
    started = await store.cancel(env.workflow_id)
    assert started is not None
    assert [e.step_id for e in started] == [behind.envelope.step_id]  # its session goes on
    rows = await fetch(
        rt, "SELECT status FROM steps WHERE id = ANY($1::uuid[])", [b.step_id, c.step_id]
    )
    assert {r["status"] for r in rows} == {"cancelled"}
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.CANCELLED
    before = await counts(rt, env.workflow_id)
    with pytest.raises(FenceRejected):
        await store.complete(b, outcome(b, ["j"]), opened, JOIN)
    assert await counts(rt, env.workflow_id) == before
    assert not (await store.open(c)).runnable
    assert await store.requeue(c.step_id, reason="r") is None
    assert await store.cancel(env.workflow_id) is None  # finished: nothing to cancel
    with pytest.raises(WorkflowNotFound):
        await store.cancel(uuid4())


async def test_resume_of_a_failed_workflow_reopens_the_failed_step_with_a_new_fence(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    await fail(store, env, retry_after=0.0)  # one retry: failures 1, attempt 2
    retry = env.model_copy(update={"attempt": 2})
    await fail(store, retry, retry_after=None)
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.FAILED

    [reopened] = await store.resume(env.workflow_id)
    assert reopened.step_id == env.step_id and reopened.attempt == 3
    step = await step_row(rt, env.step_id)
    assert (step["status"], step["failures"], step["error"]) == ("queued", 0, None)
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.RUNNING
    assert await store.dead_letters(include_retried=False, limit=10) == []
    assert (await store.open(reopened)).failures == 0  # the retry budget is back
    with pytest.raises(FenceRejected):  # the failed attempt cannot complete it now
        await store.complete(retry, outcome(retry), steps.OpenStep(True, ""), frozenset())
    done = await finish(store, reopened)
    assert done.status is WorkflowStatus.COMPLETED
    with pytest.raises(InvalidInput):
        await store.resume(env.workflow_id)


async def test_resume_reopens_every_failed_branch_and_the_fork_finishes(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    b, c = (await finish(store, env, ["b", "c"], JOIN)).next
    assert (await fail(store, b, retry_after=None)).workflow_failed
    await fail(store, c, retry_after=None)  # was running too: fails as well
    assert await store.workflow_status(env.workflow_id) is WorkflowStatus.FAILED

    reopened = await store.resume(env.workflow_id)
    assert sorted(e.agent for e in reopened) == ["b", "c"]  # both, not only the last
    handed: list[TaskEnvelope] = []
    for branch in reopened:
        handed += (await finish(store, branch, ["j"], JOIN)).next
    [join] = handed
    assert join.agent == "j"
    assert (await finish(store, join)).status is WorkflowStatus.COMPLETED


async def test_an_optional_join_runs_even_when_every_branch_fails(
    rt: Runtime, store: Store
) -> None:
    env = await start(store)
    b, c = (await finish(store, env, ["b", "c"], JOIN)).next
    first = await fail(store, b, retry_after=None, tolerated=True)
    assert not first.workflow_failed and first.promoted == []  # c is still open
    last = await fail(store, c, retry_after=None, tolerated=True)
    assert not last.workflow_failed
    [join] = last.promoted  # nobody reached the join: it is created, and runs once
    assert join.agent == "j"
    assert join.payload["branch_errors"] == {"b": "boom", "c": "boom"}
    assert (await finish(store, join)).status is WorkflowStatus.COMPLETED


async def test_heartbeat_returns_only_steps_still_at_the_given_attempt(
    rt: Runtime, store: Store
) -> None:
    kept, moved, closed = await start(store), await start(store), await start(store)
    await store.requeue(moved.step_id, reason="r")
    await finish(store, closed)
    old = (await step_row(rt, kept.step_id))["updated_at"]
    await anyio.sleep(0.01)
    alive = await store.heartbeat([(s.step_id, 1) for s in (kept, moved, closed)])
    assert alive == {kept.step_id}
    assert (await step_row(rt, kept.step_id))["updated_at"] > old
    assert await store.heartbeat([]) == set()
    assert await store.heartbeat([(moved.step_id, 2)]) == {moved.step_id}


async def test_workflows_and_steps_get_time_ordered_ids(rt: Runtime, store: Store) -> None:
    env = await start(store)
    done = await finish(store, env, ["b"])
    assert env.workflow_id.version == env.step_id.version == 7
    assert [e.step_id.version for e in done.next] == [7]
