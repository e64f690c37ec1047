"""`orchestrator show`: the whole story of one workflow; replays recorded; id prefixes."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from uuid import UUID

import pytest

from orchestrator.cli.maintenance import forget_customer
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from tests.conftest import fetch
from tests.cost_app import Probe, build_cost_app, priced_runtime, scripted_model
from tests.test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with priced_runtime(settings, build_cost_app(probe), scripted_model()) as runtime:
        yield runtime


async def test_a_replayed_tool_call_is_recorded_with_the_step(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = 1  # attempt 1 calls the tool and fails; attempt 2 replays it
    wid = await Client(rt).submit("plan_write", {"topic": "refund"})
    await Worker(rt, reconcile=False).run_until_idle(timeout=60)
    assert probe.lookups == 1
    events = await fetch(
        rt,
        "SELECT type, data FROM events WHERE workflow_id = $1 AND type = 'tool.replayed'",
        wid,
    )
    assert [e["data"] for e in events] == [
        {
            "key": f"{wid}:0:0",
            "tool": "lookup",
            "ordinal": 0,
            "attempt": 2,
            "recorded_attempt": 1,
        }
    ]


def _env(settings: Settings) -> dict[str, str]:
    return {
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
        "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
        "COLUMNS": "200",
    }


async def _story_workflow(rt: Runtime, probe: Probe) -> UUID:
    """planner: fails once after its model call, recall and tool call, then replays the
    tool; approver: parks on the signal 'approval', woken by it; writer: a model call."""
    probe.failures_left = 1
    client, worker = Client(rt), Worker(rt, reconcile=False)
    wid = await client.submit("story", {"topic": "refund"}, tenant="acme")
    await worker.run_until_idle(timeout=60)  # the approver is parked now
    assert await client.signal(wid, "approval", {"by": "dana"})
    await worker.run_until_idle(timeout=60)
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    return wid


async def test_show_tells_the_whole_story(rt: Runtime, probe: Probe) -> None:
    wid = await _story_workflow(rt, probe)
    env = _env(rt.settings)

    shown = run_cli("show", str(wid)[:8], env=env)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    for expected in [
        f"workflow {wid} · completed · pipeline story · tenant acme",
        "model scripted-model: 3 call(s), 4,000 prompt + 2,000 completion tokens · $0.024",
        "step 0 planner · completed · from submit · attempt 2",
        "step 1 approver · completed · from planner · attempt 2",
        "step 2 writer · completed · from approver · attempt 1",
        "attempt 1 · failed · worker ",
        "error: RuntimeError: planner hiccup → retried after",
        f"tool lookup executed · key {wid}:0:0 · succeeded",
        f"tool lookup replayed · key {wid}:0:0 · succeeded (recorded by attempt 1)",
        "model scripted-model: 1 call(s), 1,000 prompt + 500 completion tokens · $0.006",
        "model scripted-model: 1 call(s), 2,000 prompt + 1,000 completion tokens · $0.012",
        "memory recalled 'refund policy' (",
        "parked ",
        "waiting for signal 'approval'",
        "by signal approval",
        'approval {"by": "dana"} · sent ',
        "taken by step 1",
        "Dear customer, it is refunded.",
    ]:
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert "attempt 1 · waiting" in text  # the approver's first run parked

    as_json = run_cli("show", "--json", str(wid), env=env)
    assert as_json.returncode == 0, as_json.stderr
    story = json.loads(as_json.stdout)
    assert story["schema_version"] == 1
    assert set(story) == {
        "schema_version",
        "workflow",
        "steps",
        "signals",
        "output",
        "state",
        "events",
    }
    assert story["workflow"]["id"] == str(wid) and story["workflow"]["status"] == "completed"
    assert story["workflow"]["model"] == {
        "model": "scripted-model",
        "calls": 3,
        "prompt_tokens": 4000,
        "completion_tokens": 2000,
        "cost_usd": 0.024,
    }
    planner, approver, writer = story["steps"]
    assert [a["outcome"] for a in planner["attempts"]] == ["failed", "completed"]
    first, second = planner["attempts"]
    assert first["decision"] == "retried" and first["retry_after_seconds"] > 0
    assert first["error"] == "RuntimeError: planner hiccup"
    assert [(t["how"], t["key"]) for t in first["tool_calls"]] == [("executed", f"{wid}:0:0")]
    assert [(t["how"], t["recorded_attempt"]) for t in second["tool_calls"]] == [("replayed", 1)]
    assert second["model"]["cost_usd"] == 0.006 and planner["cost_usd"] == 0.012
    assert [r["query"] for r in planner["recalls"]] == ["refund policy"]
    assert [a["outcome"] for a in approver["attempts"]] == ["waiting", "completed"]
    assert [(w["kind"], w["signal"] or w["by"]) for w in approver["waits"]] == [
        ("parked", "approval"),
        ("woken", "signal approval"),
    ]
    assert story["signals"][0]["name"] == "approval" and story["signals"][0]["taken_by_seq"] == 1
    assert writer["attempts"][0]["model"]["calls"] == 1
    assert story["output"] == {"text": "Dear customer, it is refunded."}
    assert story["events"][0]["type"] == "workflow.submitted"


async def test_workflow_ids_by_unique_prefix(rt: Runtime) -> None:
    client = Client(rt)
    # 17 ids: by pigeonhole, two share a first hex digit; some two-digit start is nobody's.
    ids = [await client.submit("free", {"n": i}) for i in range(17)]
    texts = [str(w) for w in ids]
    mine = ids[0]
    unique = next(
        texts[0][:n] for n in range(1, 37) if sum(t.startswith(texts[0][:n]) for t in texts) == 1
    )
    assert await client.resolve(unique) == mine
    assert await client.resolve(unique.upper()) == mine
    assert await client.resolve(texts[0][:13]) == mine  # with its dash
    assert await client.resolve(texts[0].replace("-", "")) == mine
    assert await client.resolve(texts[0]) == mine

    shared = Counter(t[0] for t in texts).most_common(1)[0][0]
    with pytest.raises(InvalidInput, match=f"prefix '{shared}' is ambiguous: .* give more"):
        await client.resolve(shared)
    nobody = next(
        f"{i:02x}" for i in range(256) if not any(t.startswith(f"{i:02x}") for t in texts)
    )
    with pytest.raises(InvalidInput, match=f"no workflow {nobody} \\(no id starts with it\\)"):
        await client.resolve(nobody)
    with pytest.raises(InvalidInput, match=r"no workflow 00000000-0000-0000-0000-000000000000$"):
        await client.resolve("00000000-0000-0000-0000-000000000000")
    for bad in ["", "zz", "abc-d", texts[0] + "0", "12345678--"]:
        with pytest.raises(InvalidInput, match="not a workflow id"):
            await client.resolve(bad)

    env = _env(rt.settings)
    assert_one_line_error(run_cli("show", shared, env=env), "is ambiguous")
    assert_one_line_error(run_cli("show", nobody, env=env), f"no workflow {nobody}")
    assert_one_line_error(run_cli("show", "not-an-id", env=env), "not a workflow id")
    assert run_cli("show", unique, env=env).returncode == 0


async def test_a_failure_out_of_attempts_is_dead_lettered_in_the_story(
    rt: Runtime, probe: Probe
) -> None:
    probe.failures_left = 3  # as many as the attempts allowed
    client = Client(rt)
    wid = await client.submit("plan_write", {"topic": "refund"})
    await Worker(rt, reconcile=False).run_until_idle(timeout=60)
    story = await client.story(wid)
    assert story.workflow.status == "failed"
    assert story.workflow.error == "planner: RuntimeError: planner hiccup"
    [planner] = story.steps
    assert [(a.outcome, a.decision) for a in planner.attempts] == [
        ("failed", "retried"),
        ("failed", "retried"),
        ("failed", "dead-lettered"),
    ]
    assert [[t.how for t in a.tool_calls] for a in planner.attempts] == [
        ["executed"],
        ["replayed"],
        ["replayed"],
    ]
    assert story.output is None and story.workflow.model.calls == 3


async def test_the_story_survives_erasure_and_pruning(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = 1
    client = Client(rt)
    wid = await client.submit("plan_write", {"topic": "refund"}, tenant="acme", customer="cus_9")
    await Worker(rt, reconcile=False).run_until_idle(timeout=60)
    other = await client.submit("plan_write", {"topic": "late"}, tenant="acme", customer="cus_8")
    await Worker(rt, reconcile=False).run_until_idle(timeout=60)

    await forget_customer(rt, "acme", "cus_9")  # event data blanked, tool runs deleted
    erased = await client.story(wid)
    assert [s.agent for s in erased.steps] == ["planner", "writer"]
    assert [len(s.attempts) for s in erased.steps] == [2, 1]
    assert erased.workflow.model.cost_usd == 0.024  # counts and costs stay

    report = await rt.store.prune(older_than_seconds=0)  # the other one
    assert report.workflows == 1
    pruned = await client.story(other)
    assert pruned.workflow.pruned and pruned.events == ()
    assert [s.attempts for s in pruned.steps] == [(), ()]
    assert pruned.workflow.model.cost_usd == 0.018  # the workflow's own column stays
