"""Parallel branches and joins, durable timers and signals, against real worker processes.

What this module proves, each row of the fault table by one break:

* a fork into three parallel branches and a join, with workers SIGKILLed at every
  crash point (after_claim, after_tool_effect, after_commit, after_xadd): every
  workflow completes, no branch is lost (each branch's effect applied exactly once
  per workflow), the join runs once (one join step, completed once, its effect
  applied once) and sees the output of all three branches;
* steps sleeping durably (``ctx.sleep``) while Redis loses everything (FLUSHALL):
  the timers live in Postgres, every step wakes after its due time and completes,
  each effect once, no worker exits;
* steps waiting for a signal (``ctx.wait_for("approval")``) while the test sends
  the signals and workers are SIGKILLed (by the test, then at after_claim or
  after_commit): every workflow completes once, with the payload of its own signal
  in its output, whether the signal woke a parked step or was kept for a late one.

Effects are counted outside the runtime, by the tool server, under the tag
``<workflow id>:<label>`` the tools give (tests/fault/app.py): a step run a second
time under another step number (another idempotency key) still shows as a second
effect of its label. ``scenario()`` checks the general invariants (none lost, no
unexpected worker exit, no excess attempts beyond the faults injected, no step
completed twice, one effect per recorded call); the tests add their own, and no
failed attempt and no deadlock in any worker log (nothing here is meant to fail).
Sleeping and waiting raise a step's fence once per park without any fault, so the
excess attempts are measured with ``MEASURE_EXCESS_PARKED``.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import anyio.to_thread
import pytest

from orchestrator.client import Client
from orchestrator.runtime import Runtime
from orchestrator.schemas import EventType
from tests.fault import toolserver
from tests.fault.app import BRANCHES
from tests.fault.harness import MEASURE_EXCESS_PARKED, ROWS, Fleet, Row, scenario

pytestmark = [pytest.mark.fault, pytest.mark.anyio, pytest.mark.timeout(120)]

SCENARIO_TIMEOUT = 40.0  # each runs in about 10 s; one that hangs fails in bounded time
CRASH_POINTS = ["after_claim", "after_tool_effect", "after_commit", "after_xadd"]
FANOUT_WORKFLOWS = 6  # 5 steps each: a fork, three branches, a join
FANOUT_LABELS = ("fan_fork", *BRANCHES, "fan_join")
NAPS = 8
NAP_SECONDS = 2.0
NAP_LABELS = ("nap_before", "nap_after")
APPROVALS = 4  # wait at once: a signal wakes them
APPROVALS_LATE = 3  # a second late to their wait: a signal is kept for them
APPROVE_LABELS = ("approve_asked", "approve_done")
SIGNAL_GAP_SECONDS = 0.1  # between two signals, so kills land while they are sent

# --------------------------------------------------------------------------- helpers

STEPS = """
SELECT s.id, s.workflow_id, s.seq, s.agent, s.status, s.output, s.attempt, s.failures,
       w.pipeline,
       (SELECT count(*) FROM step_attempts a
        WHERE a.step_id = s.id AND a.outcome = 'completed') AS completions
FROM steps s JOIN workflows w ON w.id = s.workflow_id
WHERE s.workflow_id = ANY($1::uuid[]) ORDER BY s.workflow_id, s.seq
"""
ATTEMPTS = """
SELECT a.step_id, s.agent, a.attempt, a.outcome, a.error, a.started_at, a.finished_at
FROM step_attempts a JOIN steps s ON s.id = a.step_id
WHERE s.workflow_id = ANY($1::uuid[]) ORDER BY a.step_id, a.attempt
"""
COMPLETED_EVENTS = """
SELECT workflow_id, count(*) AS n FROM events
WHERE workflow_id = ANY($1::uuid[]) AND type = $2 GROUP BY workflow_id
"""
SIGNALS = """
SELECT workflow_id, name, payload, step_id, ordinal FROM signals
WHERE workflow_id = ANY($1::uuid[]) ORDER BY id
"""
PARKED_NAPS = """
SELECT count(*) FILTER (WHERE status = 'waiting' AND not_before > now() + interval '0.3 s')
           AS parked,
       count(*) FILTER (WHERE status = 'completed') AS ended
FROM steps WHERE workflow_id = ANY($1::uuid[])
"""
PIPELINE_IDS = "SELECT id FROM workflows WHERE pipeline = $1 ORDER BY created_at, id"


async def _inspect(rt: Runtime, ids: list[UUID]) -> dict[str, Any]:
    """What the checks need, read while the scenario's runtime is open."""
    async with rt.pool.acquire() as conn:
        steps = [dict(r) for r in await conn.fetch(STEPS, ids)]
        attempts = [dict(r) for r in await conn.fetch(ATTEMPTS, ids)]
        completed = {
            r["workflow_id"]: r["n"]
            for r in await conn.fetch(COMPLETED_EVENTS, ids, EventType.WORKFLOW_COMPLETED.value)
        }
        signals = [dict(r) for r in await conn.fetch(SIGNALS, ids)]
    return {"steps": steps, "attempts": attempts, "completed_events": completed, "signals": signals}


def _of(inspected: dict[str, Any], pipeline: str) -> list[UUID]:
    return sorted({s["workflow_id"] for s in inspected["steps"] if s["pipeline"] == pipeline})


def _effects_by_label(tool_url: str, ids: list[UUID], labels: tuple[str, ...]) -> list[str]:
    """Every (workflow, label) whose effect the tool server did not apply exactly once,
    and every tag of these workflows with a label nobody expected."""
    by_tag: dict[str, int] = toolserver.tags(tool_url)["by_tag"]
    wanted = sorted(f"{wid}:{label}" for wid in ids for label in labels)
    mine = {str(wid) for wid in ids}
    wrong = [f"{tag}: {by_tag.get(tag, 0)} effect(s)" for tag in wanted if by_tag.get(tag) != 1]
    stray = [f"{tag}: unexpected" for tag in by_tag if tag.split(":")[0] in mine]
    return wrong + [s for s in stray if s.split(": ")[0] not in wanted]


def _failed_attempts(inspected: dict[str, Any]) -> list[str]:
    """Attempts that failed: nothing in these scenarios fails (a SIGKILL leaves no failed
    attempt, only a takeover), so any failure is the runtime's own (a deadlock, say)."""
    return [
        f"{a['agent']} attempt {a['attempt']}: {a['error']}"
        for a in inspected["attempts"]
        if a["outcome"] == "failed"
    ]


def _completed_once(inspected: dict[str, Any], ids: list[UUID]) -> list[str]:
    """Workflows without exactly one ``workflow.completed`` event."""
    events = inspected["completed_events"]
    return [f"{wid}: {events.get(wid, 0)}" for wid in ids if events.get(wid, 0) != 1]


Run = Callable[..., Awaitable[dict[str, Any]]]


@pytest.fixture(autouse=True)
def _reap_before_stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker armed with ``after_commit`` kills itself right after the commit that
    ended the last workflow; the harness may see every workflow terminal and stop the
    fleet before that SIGKILL is reaped, and ``Fleet.stop`` counts any exit it collects
    but 0 and SIGTERM as unexpected. Reap such deaths first (as crashes: ``keep_alive``
    still counts any other exit as unexpected), then stop."""
    stop = Fleet.stop

    def reap_then_stop(fleet: Fleet) -> None:
        time.sleep(0.3)
        fleet.keep_alive(respawn=False)
        stop(fleet)

    monkeypatch.setattr(Fleet, "stop", reap_then_stop)


@pytest.fixture
def run(servers: dict[str, Any]) -> Run:
    """``scenario(servers, name, ...)`` with ``_inspect`` and the park-aware excess measure;
    ``check(result)`` runs the test's own checks. On any failure the worker logs are
    copied out of the module's temporary directory and named in the error."""

    async def run_(name: str, check: Callable[[dict[str, Any]], None], **kwargs: Any) -> Any:
        try:
            result = await scenario(
                servers,
                name,
                excess_query=MEASURE_EXCESS_PARKED,
                inspect=_inspect,
                timeout=SCENARIO_TIMEOUT,
                **kwargs,
            )
            check(result)
            # A deadlock is retried as an outage (no failed attempt shows it): the logs do.
            assert _grep_logs(Path(servers["logs"]) / name, "deadlock") == []
        except AssertionError as exc:
            # Not under pytest's basetemp: other sessions of this machine rotate it away.
            kept = Path(tempfile.mkdtemp(prefix="orch-fault-logs-")) / name.replace("/", "_")
            shutil.copytree(Path(servers["logs"]) / name, kept, dirs_exist_ok=True)
            raise AssertionError(f"{exc}\nworker logs kept in {kept}") from exc
        return result

    return run_


def _grep_logs(logs: Path, needle: str) -> list[str]:
    return [
        f"{path.name}: {line}"
        for path in sorted(logs.glob("worker-*.log"))
        for line in path.read_text(errors="replace").splitlines()
        if needle.lower() in line.lower()
    ]


async def _until(what: str, check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await anyio.sleep(0.05)


async def _ids_of(rt: Runtime, pipeline: str) -> list[UUID]:
    async with rt.pool.acquire() as conn:
        return [r["id"] for r in await conn.fetch(PIPELINE_IDS, pipeline)]


# --------------------------------------------------------------------------- fan-out, join


@pytest.mark.parametrize("point", CRASH_POINTS)
async def test_fan_out_and_join_under_sigkill(
    servers: dict[str, Any], run: Run, point: str
) -> None:
    def check(result: dict[str, Any]) -> None:
        row: Row = result["row"]
        assert row.crashes >= 2, "the crash point was not reached often enough to test anything"
        assert row.completed == row.workflows == FANOUT_WORKFLOWS, result["reasons"]
        inspected = result["inspected"]
        ids = _of(inspected, "fanout")
        assert len(ids) == FANOUT_WORKFLOWS
        assert _completed_once(inspected, ids) == []
        assert _failed_attempts(inspected) == []
        # No lost branch, no second join: each label's effect applied once per workflow.
        assert _effects_by_label(servers["tool_url"], ids, FANOUT_LABELS) == []
        for wid in ids:
            steps = [s for s in inspected["steps"] if s["workflow_id"] == wid]
            # One step per agent: three branches, one join; each completed exactly once.
            assert Counter(s["agent"] for s in steps) == Counter(FANOUT_LABELS), steps
            assert {(s["status"], s["completions"]) for s in steps} == {("completed", 1)}, steps
            # The join saw every branch's output, as each branch recorded it.
            (join,) = [s for s in steps if s["agent"] == "fan_join"]
            branches = [s for s in steps if s["agent"] in BRANCHES]
            outputs = {s["agent"]: s["output"]["effect_id"] for s in branches}
            assert join["output"]["saw"] == outputs, (join, outputs)

    await run(
        f"fan-out/join SIGKILL {point}",
        check,
        pipelines={"fanout": FANOUT_WORKFLOWS},
        extra_env={
            "ORCHESTRATOR_CRASH_AT": point,
            "ORCHESTRATOR_CRASH_AFTER": "2",
            "FAULT_STEP_SECONDS": "0.1",  # branches in flight together when the kill lands
        },
        # Both first workers are armed: each dies at its second crash point. The one
        # crash allowed keeps one replacement armed at most, then the fleet runs clean.
        crashes=1,
    )


# --------------------------------------------------------------------------- durable timers


async def test_durable_sleep_survives_redis_flushall(servers: dict[str, Any], run: Run) -> None:
    """Every nap step parks (its timer only in Postgres); Redis loses everything; the
    workers wake each step from Postgres after its due time. (A restart of Redis empty
    proves nothing more about timers than FLUSHALL; test_faults covers it for steps.)"""
    seen: dict[str, Any] = {}

    async def lose_redis(rt: Runtime, fleet: Fleet) -> int | None:
        ids = await _ids_of(rt, "nap")

        async def parked() -> bool:
            async with rt.pool.acquire() as conn:
                row = await conn.fetchrow(PARKED_NAPS, ids)
            seen["parked"] = row["parked"]
            # A nap that ended already never parked: waiting longer is no use.
            return bool(row["parked"] == len(ids) or row["ended"])

        try:
            await _until("every nap step parked", parked, 20)
        finally:  # lose Redis anyway: the checks say what was parked
            servers["redis"].flush()
            seen["lost_at"] = time.time()
        return 1

    def check(result: dict[str, Any]) -> None:
        row: Row = result["row"]
        assert row.completed == row.workflows == NAPS + 1, result["reasons"]
        assert seen["parked"] == NAPS, f"only {seen['parked']} of {NAPS} naps parked at the loss"
        inspected = result["inspected"]
        ids = _of(inspected, "nap")
        assert _completed_once(inspected, ids) == []
        assert _failed_attempts(inspected) == []
        assert _effects_by_label(servers["tool_url"], ids, NAP_LABELS) == []
        naps = {s["id"] for s in inspected["steps"] if s["agent"] == "nap"}
        assert len(naps) == NAPS
        for step in naps:
            attempts = [a for a in inspected["attempts"] if a["step_id"] == step]
            (parked,) = [a for a in attempts if a["outcome"] == "waiting"]
            (done,) = [a for a in attempts if a["outcome"] == "completed"]
            # Woken after its due time (set at the park), and after Redis was lost.
            slept = (done["started_at"] - parked["finished_at"]).total_seconds()
            assert slept >= NAP_SECONDS - 0.05, (step, slept)
            assert done["started_at"].timestamp() > seen["lost_at"], (step, done)

    await run(
        "durable sleep, Redis FLUSHALL",
        check,
        # The quick workflow ends first, which starts the disturbance (harness rule).
        pipelines={"three": 1, "nap": NAPS},
        disturb=lose_redis,
        extra_env={"FAULT_NAP_SECONDS": str(NAP_SECONDS)},
    )


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("point", ["after_claim", "after_commit"])
async def test_signals_sent_while_workers_are_killed(
    servers: dict[str, Any], run: Run, point: str
) -> None:
    """Once every workflow is under way, the signals go out while the first workers are
    SIGKILLed one after the other: first to the late steps (not waiting yet: the signal
    is kept for their wait), then to the steps parked on their wait (the signal wakes
    them). The killed workers are replaced by workers armed with the crash point, which
    die there running the steps the signals resumed (then unarmed ones finish)."""
    sent: dict[UUID, tuple[dict[str, Any], bool]] = {}  # workflow -> (payload, woke a step)
    seen: dict[str, Any] = {}

    async def send_approvals(rt: Runtime, fleet: Fleet) -> int | None:
        client = Client(rt)
        ids = await _ids_of(rt, "approve_late") + await _ids_of(rt, "approve")
        victims = list(fleet.procs)
        seen["killed"] = len(victims)
        fleet.env = {**fleet.env, "ORCHESTRATOR_CRASH_AT": point, "ORCHESTRATOR_CRASH_AFTER": "1"}
        # Each victim's replacement is armed; a replacement's replacement is not.
        fleet.crashes_left = len(victims) + 1
        every = -(-len(ids) // len(victims))
        for i, wid in enumerate(ids):
            if i % every == 0 and victims:
                victim = victims.pop(0)
                fleet.kill(victim)
                await anyio.to_thread.run_sync(victim.wait)
            fleet.keep_alive()
            payload = {"approved_by": f"manager-{i}", "for": str(wid)}
            sent[wid] = (payload, await client.signal(wid, "approval", payload))
            await anyio.sleep(SIGNAL_GAP_SECONDS)
        return 0  # the kills are counted by the fleet

    def check(result: dict[str, Any]) -> None:
        row: Row = result["row"]
        assert row.crashes > seen["killed"], f"no worker died at {point}"
        assert row.completed == row.workflows == len(sent) + 1, result["reasons"]
        inspected = result["inspected"]
        ids = sorted(_of(inspected, "approve") + _of(inspected, "approve_late"))
        assert sorted(sent) == ids
        woke = sum(woken for _, woken in sent.values())
        assert 0 < woke < len(ids), f"{woke} of {len(ids)} signals woke a parked step"
        assert _completed_once(inspected, ids) == []
        assert _failed_attempts(inspected) == []
        assert _effects_by_label(servers["tool_url"], ids, APPROVE_LABELS) == []
        for wid in ids:
            (step,) = [s for s in inspected["steps"] if s["workflow_id"] == wid]
            assert step["status"] == "completed" and step["completions"] == 1, step
            # Its own signal's payload, recorded in its output.
            assert step["output"]["approval"] == sent[wid][0], (step, sent[wid])
            # One signal, taken by the step's first wait.
            signals = [g for g in inspected["signals"] if g["workflow_id"] == wid]
            assert [(g["step_id"], g["ordinal"]) for g in signals] == [(step["id"], 0)], signals

    await run(
        f"signals, SIGKILL {point}",
        check,
        # The quick workflow ends first, which starts the disturbance (harness rule).
        pipelines={"three": 1, "approve_late": APPROVALS_LATE, "approve": APPROVALS},
        disturb=send_approvals,
    )
    woke = sum(woken for _, woken in sent.values())
    ROWS[-1].scenario += f" ({woke} woke a wait, {len(sent) - woke} kept for one)"
