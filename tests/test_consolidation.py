"""Consolidation into long-term memory, end to end on real Redis and Postgres.

A one-agent pipeline that consolidates answers each note; the workers run with
consolidation off, so the tests drive the consolidation queue themselves (two
consolidators at once, a lost stream, malformed entries) and then read the memories
as the database owner. No timing is asserted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import anyio
import pytest
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.coordination import consolidation as queue
from orchestrator.engine.consolidator import (
    MAX_FAILURES,
    Consolidator,
    consolidate,
    lag,
    requeue_unconsolidated,
)
from orchestrator.engine.worker import Worker
from orchestrator.errors import AgentError
from orchestrator.models.distill import Distilled, Finished, Line, distill_offline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.store import dead_letters, memory_gate, tenancy
from orchestrator.store.migrations import V14_GIVEN_UP_CONSOLIDATIONS
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio

TENANT = "acme"


class Note(BaseModel):
    """The pipeline input: who wrote, about what, and what they said."""

    customer_id: str
    subject: str
    body: str


class NoteIn(AgentInput):
    input: Note


class Reply(AgentOutput):
    text: str


def build_app() -> App:
    app = App("consolidation-test", version="test")

    @app.agent
    class Answer(Agent[NoteIn, Reply]):
        name = "answer"
        input_model = NoteIn
        output_model = Reply

        async def run(self, ctx: StepContext, data: NoteIn) -> Reply:
            text = f"We fixed {data.input.subject.lower()} for you. Thanks for writing."
            ctx.say(text)
            return Reply(text=text)

    app.pipeline("notes", ["answer"], input_model=Note, consolidate=True)
    app.validate()
    return app


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app()) as runtime:
        yield runtime


async def complete(rt: Runtime, *notes: Note) -> list[UUID]:
    """Submit ``notes`` (one session each) and run them to completion; their
    consolidation entries stay in the stream (the worker does not consolidate)."""
    client = Client(rt)
    ids = [await client.submit("notes", n, tenant=TENANT) for n in notes]
    await Worker(rt, reconcile=False, consolidate=False).run_until_idle(timeout=30)
    return ids


async def drain(*consolidators: Consolidator) -> None:
    """Run the consolidators at once until the queue is empty (a hang guard, no timing)."""

    async def loop(c: Consolidator) -> None:
        while True:
            await c.once(block_ms=10)
            state = await queue.state(c.rt.redis, c.rt.keys)
            if not state.undelivered and not state.pending:
                return

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            for c in consolidators:
                tg.start_soon(loop, c)


async def memories(rt: Runtime, customer: str) -> dict[tuple[str, str], Any]:
    rows = await fetch(
        rt,
        "SELECT * FROM memories WHERE tenant_id = $1 AND customer_id = $2",
        TENANT,
        customer,
    )
    return {(r["kind"], r["key"]): r for r in rows}


async def test_a_completed_workflow_becomes_a_summary_and_facts_with_their_source(
    rt: Runtime,
) -> None:
    (wid,) = await complete(
        rt,
        Note(
            customer_id="c-1",
            subject="Late parcel",
            body="My parcel is late. I prefer to be contacted by email. I think I prefer mornings.",
        ),
    )
    await drain(Consolidator(rt, "c1"))

    found = await memories(rt, "c-1")
    messages = await fetch(rt, "SELECT id, role FROM messages WHERE workflow_id = $1", wid)
    said = {r["role"]: r["id"] for r in messages}
    (step,) = await fetch(rt, "SELECT id FROM steps WHERE workflow_id = $1", wid)
    summary = found[("summary", f"summary:{wid}")]
    assert summary["content"] == "Late parcel: We fixed late parcel for you."
    assert (summary["source_workflow"], summary["source_step"]) == (wid, step["id"])
    assert summary["source_message"] == said["agent"]
    preference = found[("preference", "preference:contact-channel")]
    assert preference["content"] == "I prefer to be contacted by email."
    assert preference["source_message"] == said["customer"]
    assert preference["source_step"] is None  # the customer said it, no step did
    assert 0.5 <= preference["confidence"] <= 1 and preference["mentions"] == 1
    assert ("fact", "fact:parcel") in found and ("outcome", "outcome:late-parcel") in found
    assert not [k for k in found if "mornings" in k[1]]  # hedged: below the gate's floor
    (marked,) = await fetch(rt, "SELECT consolidated_at FROM workflows WHERE id = $1", wid)
    assert marked["consolidated_at"] is not None


async def test_the_gate_merges_near_duplicates_and_updates_a_contradicted_fact(
    rt: Runtime,
) -> None:
    said = "Please send invoices. I prefer to be contacted by {}."
    for channel in ("email", "phone", "phone"):
        await complete(rt, Note(customer_id="c-2", subject="Invoice", body=said.format(channel)))
        await drain(Consolidator(rt, "c1"))

    channel = (await memories(rt, "c-2"))[("preference", "preference:contact-channel")]
    assert channel["content"] == "I prefer to be contacted by phone."
    assert channel["mentions"] == 2  # said twice since it replaced email
    assert channel["metadata"]["previous"]["content"] == "I prefer to be contacted by email."
    assert channel["metadata"]["latest_source"]["workflow"] != str(channel["source_workflow"])

    # Near-duplicates under different keys merge by embedding similarity.
    vector = await rt.embedder.embed("the customer's dog is called rex")
    source = memory_gate.Source(channel["source_workflow"], None, None)
    candidates = [
        memory_gate.Candidate("fact", key, text, conf, vector, source, {})
        for key, text, conf in (
            ("fact:dog", "The customer's dog is called Rex.", 0.6),
            ("fact:pet", "the customer's dog is called rex", 0.9),
            ("fact:cat", "A cat, maybe.", 0.2),
        )
    ]
    async with rt.db() as conn, tenancy.scoped(conn, TENANT):
        counts = await memory_gate.admit(
            conn,
            tenant_id=TENANT,
            customer_id="c-2",
            embedder=rt.embedder.name,
            candidates=candidates,
            min_confidence=0.5,
            merge_similarity=0.92,
        )
    assert counts == memory_gate.GateCounts(added=1, merged=1, dropped=1)
    dog = (await memories(rt, "c-2"))[("fact", "fact:dog")]
    assert (dog["mentions"], dog["confidence"]) == (2, pytest.approx(0.9))


async def test_redelivery_and_two_consolidators_write_each_memory_once(rt: Runtime) -> None:
    notes = [
        Note(customer_id="c-3", subject=f"Issue {i}", body="I prefer to be contacted by email.")
        for i in range(6)
    ]
    ids = await complete(rt, *notes)
    await queue.enqueue(rt.redis, rt.keys, ids)  # every workflow twice in the stream
    await queue.ensure_group(rt.redis, rt.keys)
    taken = await queue.read(rt.redis, rt.keys, "dead", count=3, block_ms=10)  # never acked
    first = Consolidator(rt, "c1", count=2, lease_seconds=0.05)
    second = Consolidator(rt, "c2", count=2, lease_seconds=0.05)
    await drain(first, second)

    assert len(taken) == 3  # ... and taken over from the dead consumer by XAUTOCLAIM

    assert first.consolidated + second.consolidated == len(ids)
    found = await memories(rt, "c-3")
    assert sorted(k for k, _ in found if k == "summary") == ["summary"] * len(ids)
    assert found[("preference", "preference:contact-channel")]["mentions"] == len(ids)
    again = await consolidate(rt, ids[0])  # a late redelivery finds it consolidated
    assert again is not None and again.counts is None
    assert len(await memories(rt, "c-3")) == len(found)


async def test_a_lost_stream_is_rebuilt_from_postgres_and_consolidated_once(
    rt: Runtime,
) -> None:
    ids = await complete(
        rt, *[Note(customer_id="c-4", subject=f"Lost {i}", body="Hello.") for i in range(3)]
    )
    await rt.redis.delete(rt.keys.consolidation_stream())  # Redis lost the queue
    behind = await lag(rt)
    assert (behind.undelivered, behind.pending) == (0, 0) and behind.oldest_seconds is not None

    assert await requeue_unconsolidated(rt, older_than=0) == len(ids)
    assert (await lag(rt)).undelivered == len(ids)
    await drain(Consolidator(rt, "c1"))
    assert await requeue_unconsolidated(rt, older_than=0) == 0

    summaries = await fetch(
        rt, "SELECT source_workflow FROM memories WHERE kind = 'summary' AND customer_id = 'c-4'"
    )
    assert sorted(r["source_workflow"] for r in summaries) == sorted(ids)
    assert (await lag(rt)).oldest_seconds is None


async def test_malformed_entries_are_dead_lettered_and_the_loop_goes_on(rt: Runtime) -> None:
    (wid,) = await complete(rt, Note(customer_id="c-5", subject="Fine", body="All good."))
    stream = rt.keys.consolidation_stream()
    await rt.redis.xadd(stream, {"v": "1", "w": "not-a-uuid"})
    await rt.redis.xadd(stream, {"junk": "x"})
    await queue.enqueue(rt.redis, rt.keys, [wid])  # behind the bad ones (and a duplicate)

    consolidator, stop = Consolidator(rt, "c1"), anyio.Event()
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consolidator.run, stop)
            await _until(lambda: _drained(rt))
            stop.set()

    letters = await fetch(rt, "SELECT reason FROM dead_letters WHERE agent = 'consolidation'")
    assert len(letters) == 2
    assert await rt.redis.xlen(rt.keys.dead_letter_stream()) == 2
    assert consolidator.consolidated == 1
    assert await fetch(rt, "SELECT 1 FROM memories WHERE source_workflow = $1", wid)


async def _drained(rt: Runtime) -> bool:
    state = await queue.state(rt.redis, rt.keys)
    return state.exists and not state.undelivered and not state.pending


async def _until(check: Callable[[], Any]) -> None:
    while not await check():
        await anyio.sleep(0.02)


def test_the_offline_distiller_reads_the_customers_own_sentences() -> None:
    work = Finished(
        input={"subject": "Order 42", "body": "My order number is 42. Please never call me."},
        state={},
        transcript=[
            Line(1, "customer", "c", "(the input)"),
            Line(2, "agent", "answer", "Refunded. Bye."),
            Line(3, "customer", "c", "I'm allergic to peanuts. Maybe I prefer tea."),
        ],
    )
    distilled = distill_offline(work)
    assert distilled == distill_offline(work)  # deterministic
    assert distilled.summary == "Order 42: Refunded."
    facts = {f.key: (f.kind, f.message_id, f.confidence) for f in distilled.facts}
    assert facts == {
        "fact:order-number": ("fact", 1, 0.8),
        "constraint:no-phone": ("constraint", 1, 0.9),
        "constraint:allergy-peanuts": ("constraint", 3, 0.95),
        "preference:tea": ("preference", 3, 0.4),
        "outcome:order-42": ("outcome", 2, 0.7),
    }


async def test_a_consolidation_failing_for_good_is_given_up_after_its_budget(
    rt: Runtime,
) -> None:
    """Each failure is a dead letter and the reconciler re-adds the workflow, until the
    MAX_FAILURES-th: that one gives it up, so no scan reads it again and the lag ends."""

    class Broken:
        name = "broken"

        async def distill(self, work: Finished) -> Distilled:
            raise AgentError("the model refuses this transcript", non_retryable=True)

    (wid,) = await complete(rt, Note(customer_id="c-6", subject="Broken", body="Hello."))
    consolidator = Consolidator(rt, "c1", distiller=Broken())
    for failures in range(1, MAX_FAILURES + 1):
        await drain(consolidator)  # takes the entry, fails, dead-letters it
        given_up = failures == MAX_FAILURES
        assert await requeue_unconsolidated(rt, older_than=0) == (0 if given_up else 1)

    letters = await fetch(
        rt, "SELECT 1 FROM dead_letters WHERE agent = 'consolidation' AND workflow_id = $1", wid
    )
    assert len(letters) == MAX_FAILURES
    [row] = await fetch(rt, "SELECT consolidate, consolidated_at FROM workflows WHERE id = $1", wid)
    assert (row["consolidate"], row["consolidated_at"]) == (False, None)
    assert (await lag(rt)).oldest_seconds is None
    assert consolidator.consolidated == 0


async def test_migration_v14_gives_up_only_the_spent_consolidations(rt: Runtime) -> None:
    """Written by older code: a workflow with MAX_FAILURES open consolidation dead letters
    is given up by V14's backfill; fewer, or one of them retried, stays in the queue."""
    spent, short, retried = await complete(
        rt, *[Note(customer_id="c-7", subject=f"Old {i}", body="Hello.") for i in range(3)]
    )
    async with rt.db() as conn:
        for wid, letters in ((spent, 3), (short, 2), (retried, 3)):
            for _ in range(letters):
                await dead_letters.add(
                    conn, agent="consolidation", reason="boom", envelope="{}", workflow_id=wid
                )
        await conn.execute(
            "UPDATE dead_letters SET retried_at = now() WHERE id = "
            "(SELECT min(id) FROM dead_letters WHERE workflow_id = $1)",
            retried,
        )
        await conn.execute(V14_GIVEN_UP_CONSOLIDATIONS)
    rows = await fetch(rt, "SELECT id, consolidate FROM workflows")
    assert {r["id"]: r["consolidate"] for r in rows} == {
        spent: False,
        short: True,
        retried: True,
    }
    assert await requeue_unconsolidated(rt, older_than=0) == 2  # short and retried
