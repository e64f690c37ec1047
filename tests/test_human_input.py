"""Human in the loop: a step asks, the workflow waits durably, a reply resumes it."""

from __future__ import annotations

import anyio
import pytest

from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.store import waits
from tests.conftest import fetch

pytestmark = pytest.mark.anyio

# cus_1003 has two open orders, so research cannot tell which one this is about.
UNCLEAR = Ticket(
    tenant_id="acme",
    customer_id="cus_1003",
    subject="Where is my order?",
    body="My package still has not shipped and I need it this week.",
)


async def _until(client: Client, wid: object, status: WorkflowStatus) -> None:
    with anyio.fail_after(20):
        while (await client.get(wid)).status is not status:  # type: ignore[arg-type]
            await anyio.sleep(0.05)


async def test_the_response_agent_asks_for_the_order_and_resumes(support: Runtime) -> None:
    client = Client(support)
    worker = Worker(support, concurrency=2, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        wid = await client.submit(None, UNCLEAR)
        await _until(client, wid, WorkflowStatus.WAITING)
        waiting = await client.get(wid)
        assert [(s.agent, s.status.value) for s in waiting.steps] == [
            ("triage", "completed"),
            ("research", "completed"),
            ("order_lookup", "completed"),
            ("knowledge_search", "completed"),
            ("response", "waiting"),
        ]

        await client.provide_input(wid, "Sorry, it is ord-10022")
        statuses = await client.wait([wid], timeout=20)
        worker.stop()
    assert statuses[wid] is WorkflowStatus.COMPLETED
    record = await client.get(wid)
    assert "ORD-10022" in record.state["response"]["citations"]
    assert "still being prepared" in record.state["response"]["reply"]
    transcript = await fetch(
        support,
        """
        SELECT m.role, m.content FROM messages m JOIN workflows w ON w.session_id = m.session_id
        WHERE w.id = $1 ORDER BY m.id""",
        wid,
    )
    assert [m["role"] for m in transcript] == ["customer", "agent", "customer", "agent"]
    assert transcript[1]["content"].startswith("Could you tell me the order number")
    outcomes = await fetch(
        support,
        """
        SELECT s.agent, a.outcome FROM step_attempts a JOIN steps s ON s.id = a.step_id
        WHERE s.workflow_id = $1 ORDER BY s.seq, a.attempt""",
        wid,
    )
    assert [(o["agent"], o["outcome"]) for o in outcomes] == [
        ("triage", "completed"),
        ("research", "completed"),
        ("order_lookup", "completed"),
        ("knowledge_search", "completed"),
        ("response", "waiting"),
        ("response", "completed"),
    ]


async def test_a_lost_wake_up_is_covered_by_the_reconciler(support: Runtime) -> None:
    client = Client(support)
    worker = Worker(support, concurrency=2, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        wid = await client.submit(None, UNCLEAR)
        await _until(client, wid, WorkflowStatus.WAITING)
        async with support.pool.acquire() as conn:  # the reply is recorded; Redis never hears
            await waits.send_signal(conn, wid, "input", "ORD-10010")
        fast = Reconciler(support)
        fast.rt = support
        await anyio.sleep(0.05)
        async with support.pool.acquire() as conn:
            await conn.execute(
                "UPDATE steps SET updated_at = now() - interval '1 hour' "
                "WHERE workflow_id = $1 AND status = 'queued'",
                wid,
            )
        assert (await fast.pass_once()).requeued == 1
        statuses = await client.wait([wid], timeout=20)
        worker.stop()
    assert statuses[wid] is WorkflowStatus.COMPLETED
    assert "ORD-10010" in (await client.get(wid)).state["response"]["citations"]


async def test_input_sent_before_the_question_is_kept_for_it(support: Runtime) -> None:
    client = Client(support)
    wid = await client.submit(None, UNCLEAR)
    with pytest.raises(InvalidInput, match="empty"):
        await client.provide_input(wid, "  ")
    # No step asks yet (no worker ran): the reply is kept, not refused and not lost.
    assert await client.signal(wid, "input", "ORD-10010") is False
    worker = Worker(support, concurrency=2, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        statuses = await client.wait([wid], timeout=20)
        worker.stop()
    assert statuses[wid] is WorkflowStatus.COMPLETED  # never parked: the reply was there
    assert "ORD-10010" in (await client.get(wid)).state["response"]["citations"]
    waited = await fetch(
        support,
        "SELECT count(*) AS n FROM events WHERE workflow_id = $1 AND type = $2",
        wid,
        "workflow.waiting",
    )
    assert waited[0]["n"] == 0
    done = await client.get(wid)
    with pytest.raises(InvalidInput, match="is completed; it takes no signals"):
        await client.provide_input(done.id, "too late")


async def test_watch_sees_progress_and_the_end(support: Runtime) -> None:
    client = Client(support)
    worker = Worker(support, concurrency=2, reconcile=False)
    seen: list[tuple[int, WorkflowStatus]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)

        async def follow() -> None:
            async for signal in client.watch():
                seen.append((signal.seq, signal.status))
                if signal.status.terminal:
                    return

        tg.start_soon(follow)
        await anyio.sleep(0.2)  # subscribed before the first handoff
        vague = Ticket(tenant_id="acme", customer_id="c9", subject="help", body="it doesn't work")
        wid = await client.submit(None, vague)
        with anyio.fail_after(20):
            while not seen or not seen[-1][1].terminal:
                await anyio.sleep(0.05)
        worker.stop()
    assert seen == [(0, WorkflowStatus.RUNNING), (1, WorkflowStatus.COMPLETED)]
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED


async def test_an_unanswered_question_gets_a_reminder_then_the_ticket_closes(
    support: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPPORT_REMINDER_SECONDS", "0.5")
    client = Client(support)
    worker = Worker(support, concurrency=2, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        wid = await client.submit(None, UNCLEAR)
        statuses = await client.wait([wid], timeout=30)  # nobody ever answers
        worker.stop()
    assert statuses[wid] is WorkflowStatus.COMPLETED
    record = await client.get(wid)
    assert record.state["response"]["reply"].startswith("We have not heard back")
    transcript = await fetch(
        support,
        """
        SELECT m.role, m.content FROM messages m JOIN workflows w ON w.session_id = m.session_id
        WHERE w.id = $1 ORDER BY m.id""",
        wid,
    )
    said = [m["content"][:24] for m in transcript if m["role"] == "agent"]
    assert said == [
        "Could you tell me the or",
        "Just checking in: which ",
        "We have not heard back, ",
    ]
    woken = await fetch(
        support,
        "SELECT count(*) AS n FROM events WHERE workflow_id = $1 AND type = 'step.woken'",
        wid,
    )
    assert woken[0]["n"] == 2  # the two timeouts, each woken once by a timer


async def test_a_reply_after_the_reminder_is_still_taken(
    support: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUPPORT_REMINDER_SECONDS", "0.5")
    client = Client(support)
    worker = Worker(support, concurrency=2, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        wid = await client.submit(None, UNCLEAR)
        with anyio.fail_after(20):
            while True:  # the reminder went out: the second question waits
                rows = await fetch(
                    support,
                    "SELECT count(*) AS n FROM messages WHERE workflow_id = $1 "
                    "AND content LIKE 'Just checking in%'",
                    wid,
                )
                if rows[0]["n"]:
                    break
                await anyio.sleep(0.05)
        monkeypatch.setenv("SUPPORT_REMINDER_SECONDS", "60")
        await client.provide_input(wid, "it is ORD-10010")
        statuses = await client.wait([wid], timeout=20)
        worker.stop()
    assert statuses[wid] is WorkflowStatus.COMPLETED
    assert "ORD-10010" in (await client.get(wid)).state["response"]["citations"]
