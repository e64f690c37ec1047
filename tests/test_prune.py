"""Pruning finished workflows' history: children go, the workflow, its outcome and records stay."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import UUID

import anyio
import pytest

from orchestrator.cli.maintenance import parse_duration
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.store.prune import PruneReport, prune_finished, prune_memories
from tests.apps import TICKET, Probe, build_app
from tests.conftest import fetch, runtime_for
from tests.test_cli import assert_one_line_error, run_cli

# Per workflow: how many rows of each pruned table it has.
CHILD_COUNTS = """
SELECT w.id,
       (SELECT count(*) FROM checkpoints c WHERE c.workflow_id = w.id) AS checkpoints,
       (SELECT count(*) FROM events e WHERE e.workflow_id = w.id) AS events,
       (SELECT count(*) FROM step_attempts a JOIN steps s ON s.id = a.step_id
        WHERE s.workflow_id = w.id) AS attempts,
       (SELECT count(*) FROM tool_runs t WHERE t.workflow_id = w.id) AS tool_runs,
       (SELECT count(*) FROM signals g WHERE g.workflow_id = w.id) AS signals,
       (SELECT count(*) FROM steps s WHERE s.workflow_id = w.id) AS steps,
       (SELECT count(*) FROM messages m WHERE m.workflow_id = w.id) AS messages,
       (SELECT count(*) FROM dead_letters d WHERE d.workflow_id = w.id) AS dead_letters,
       w.status, w.error, w.pruned_at
FROM workflows w WHERE w.id = ANY($1::uuid[])
"""
PRUNED = ("checkpoints", "events", "attempts", "tool_runs", "signals")
KEPT = ("steps", "messages", "dead_letters")


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(Probe())) as runtime:
        yield runtime


async def counts(rt: Runtime, *ids: UUID) -> dict[UUID, dict[str, object]]:
    return {r["id"]: dict(r) for r in await fetch(rt, CHILD_COUNTS, list(ids))}


async def prune(rt: Runtime, *, older_than: float, batch: int = 500) -> PruneReport:
    async with rt.pool.acquire() as conn:
        return await prune_finished(conn, older_than_seconds=older_than, batch=batch)


@pytest.mark.anyio
async def test_prune_removes_old_history_and_keeps_the_record(rt: Runtime) -> None:
    client = Client(rt)
    done = await client.submit("flaky", TICKET)  # tools, attempt, checkpoint
    failed = await client.submit("refuses", TICKET)  # dead-lettered
    recent = await client.submit("flaky", TICKET)
    # Signals nobody waits for stay untaken; one of them is marked taken by a step of
    # its workflow, as a wait would (pruning reaches the two kinds by different keys).
    for workflow in (done, done, recent):
        assert not await client.signal(workflow, "note", {"text": "kept until pruned"})
    await fetch(
        rt,
        "UPDATE signals SET step_id = (SELECT id FROM steps WHERE workflow_id = $1), ordinal = 0"
        " WHERE id = (SELECT min(id) FROM signals WHERE workflow_id = $1)",
        done,
    )
    worker = Worker(rt, concurrency=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        finished = await client.wait([done, failed, recent], timeout=20)
        worker.stop()
    assert finished == {
        done: WorkflowStatus.COMPLETED,
        failed: WorkflowStatus.FAILED,
        recent: WorkflowStatus.COMPLETED,
    }
    running = await client.submit("flaky", TICKET)  # no worker: stays running
    await fetch(
        rt,
        "UPDATE workflows SET completed_at = now() - interval '2 days', "
        "created_at = now() - interval '2 days' WHERE id = ANY($1::uuid[])",
        [done, failed, running],
    )
    before = await counts(rt, done, failed, recent, running)
    assert all(before[done][t] for t in PRUNED)
    assert before[failed]["dead_letters"] and before[failed]["attempts"]
    output_before = (await client.get(done)).steps[0].output

    report = await prune(rt, older_than=86400, batch=1)  # one workflow per batch: loops

    old = (done, failed)

    def total(table: str) -> int:
        return sum(int(before[w][table]) for w in old)  # type: ignore[call-overload]

    assert report == PruneReport(
        workflows=2,
        checkpoints=total("checkpoints"),
        events=total("events"),
        attempts=total("attempts"),
        tool_runs=total("tool_runs"),
        signals=2,
    )
    after = await counts(rt, done, failed, recent, running)
    for w in old:
        assert all(after[w][t] == 0 for t in PRUNED)
        assert all(after[w][t] == before[w][t] for t in KEPT)
        assert after[w]["status"] == before[w]["status"]
        assert after[w]["error"] == before[w]["error"]
        assert after[w]["pruned_at"] is not None
    assert after[failed]["error"]
    for w in (recent, running):
        assert after[w] == before[w]  # untouched, pruned_at still NULL
    record = await client.get(done)
    assert record.status is WorkflowStatus.COMPLETED
    assert record.steps[0].output == output_before

    assert await prune(rt, older_than=86400) == PruneReport()  # nothing left to do


@pytest.mark.parametrize(
    ("text", "seconds"), [("30d", 2_592_000), ("12h", 43_200), ("90m", 5_400), ("45s", 45)]
)
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["yesterday", "30", "1.5h", "30x", "d", "", "0d", "-5d"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(InvalidInput):
        parse_duration(text)


def test_prune_cli_rejects_a_bad_duration() -> None:
    assert_one_line_error(run_cli("prune", "--older-than", "yesterday"), "not a duration")


def test_prune_cli_prints_counts(cli_env: dict[str, str]) -> None:
    result = run_cli("prune", "--older-than", "30d", "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "workflows": 0,
        "checkpoints": 0,
        "events": 0,
        "attempts": 0,
        "tool_runs": 0,
        "memories": 0,
        "signals": 0,
    }
    result = run_cli("prune", "--older-than", "12h", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("pruned 0 workflow(s) finished over 12h ago")


# (key, tenant, customer, confidence, days since written, days since last used or None)
MEMORIES = [
    ("decayed", "t1", "c1", 0.8, 400, None),  # 0.8 * 0.5 ** (400 / 90) = 0.04
    ("used", "t1", "c1", 0.8, 400, 1),  # last used yesterday: 0.79
    ("fresh", "t1", "c1", 0.9, 0, None),
    ("weak", "t1", "c1", 0.05, 0, None),  # below the floor from the start
    ("pinned", "t1", "", 1.0, 1000, None),  # the tenant's seeded knowledge
    ("shared", "t1", "", 0.6, 400, None),  # tenant-wide, but not pinned
    ("elsewhere", "t2", "c1", 0.8, 400, None),  # another tenant: swept too
    ("recent", "t2", "c1", 0.8, 20, 20),
]
INSERT_MEMORY = """
INSERT INTO memories (tenant_id, customer_id, kind, key, content, embedder, confidence,
                      updated_at, last_used_at)
VALUES ($2, $3, 'fact', $1, $1, 'lexical', $4, now() - make_interval(days => $5),
        now() - make_interval(days => $6))
"""


async def memory_keys(rt: Runtime) -> set[str]:
    return {r["key"] for r in await fetch(rt, "SELECT key FROM memories")}


async def sweep(rt: Runtime, **kwargs: float | None) -> PruneReport:
    async with rt.pool.acquire() as conn:  # the engine's scope, every tenant
        return await prune_memories(conn, half_life_days=90, prune_below=0.1, batch=2, **kwargs)


@pytest.mark.anyio
async def test_memories_decay_unless_used_and_retention_cuts_the_rest(rt: Runtime) -> None:
    for m in MEMORIES:
        await fetch(rt, INSERT_MEMORY, *m)

    assert await sweep(rt) == PruneReport(memories=4)  # batches of 2: it loops
    assert await memory_keys(rt) == {"used", "fresh", "pinned", "recent"}
    assert await sweep(rt) == PruneReport()

    # A retention of 30 days cuts what was written before, used or not; pinned stays.
    assert await sweep(rt, retention_days=30) == PruneReport(memories=1)
    assert await memory_keys(rt) == {"fresh", "pinned", "recent"}
    with pytest.raises(InvalidInput):
        await sweep(rt, retention_days=0)
