"""One customer session runs one workflow at a time; later tickets queue behind it (FIFO)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from tests.apps import Probe, build_app
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio


def ticket(n: int, session: str = "s-1") -> Ticket:
    return Ticket(
        tenant_id="t1", customer_id="c1", subject=f"ticket {n}", body="b", session_id=session
    )


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(probe)) as runtime:
        yield runtime


async def statuses(client: Client, *ids: object) -> list[WorkflowStatus]:
    return [(await client.get(i)).status for i in ids]  # type: ignore[arg-type]


async def test_second_ticket_waits_for_the_first_then_runs(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    first = await client.submit("gated", ticket(1))
    second = await client.submit("flaky", ticket(2))
    other = await client.submit("flaky", ticket(3, session="s-2"))
    assert await statuses(client, first, second, other) == [
        WorkflowStatus.RUNNING,
        WorkflowStatus.QUEUED,
        WorkflowStatus.RUNNING,
    ]
    worker = Worker(rt, concurrency=4)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await client.wait([other], timeout=20)  # another session is not held up
        assert await statuses(client, second) == [WorkflowStatus.QUEUED]
        probe.gate.set()
        done = await client.wait([first, second], timeout=20)
        worker.stop()
    assert set(done.values()) == {WorkflowStatus.COMPLETED}
    rows = await fetch(
        rt,
        """
        SELECT w.id, w.completed_at, min(a.started_at) AS started FROM workflows w
        JOIN steps s ON s.workflow_id = w.id JOIN step_attempts a ON a.step_id = s.id
        WHERE w.id = ANY($1::uuid[]) GROUP BY w.id, w.completed_at""",
        [first, second],
    )
    by_id = {r["id"]: r for r in rows}
    assert by_id[second]["started"] >= by_id[first]["completed_at"]


async def test_cancelling_the_first_starts_the_next(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    first = await client.submit("gated", ticket(1))
    second = await client.submit("flaky", ticket(2))
    assert await client.cancel(first)
    assert await statuses(client, first, second) == [
        WorkflowStatus.CANCELLED,
        WorkflowStatus.RUNNING,
    ]
    worker = Worker(rt, concurrency=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        done = await client.wait([second], timeout=20)
        worker.stop()
    assert done[second] is WorkflowStatus.COMPLETED


async def test_a_lost_promotion_is_repaired_by_the_reconciler(rt: Runtime, probe: Probe) -> None:
    client = Client(rt)
    first = await client.submit("gated", ticket(1))
    second = await client.submit("flaky", ticket(2))
    async with rt.pool.acquire() as conn:  # the first ended, but its worker died before promoting
        await conn.execute("UPDATE workflows SET status = 'completed' WHERE id = $1", first)
    assert (await Reconciler(rt).pass_once()).requeued == 1
    assert await statuses(client, second) == [WorkflowStatus.RUNNING]
    worker = Worker(rt, concurrency=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        done = await client.wait([second], timeout=20)
        worker.stop()
    assert done[second] is WorkflowStatus.COMPLETED


async def test_concurrent_first_tickets_of_a_session_get_one_runner(rt: Runtime) -> None:
    client = Client(rt)
    ids: list[object] = []

    async def submit(n: int) -> None:
        ids.append(await client.submit("flaky", ticket(n, session="burst")))

    async with anyio.create_task_group() as tg:
        for n in range(6):
            tg.start_soon(submit, n)
    found = await statuses(client, *ids)
    assert found.count(WorkflowStatus.RUNNING) == 1
    assert found.count(WorkflowStatus.QUEUED) == 5


async def test_resuming_a_failed_ticket_queues_it_behind_the_session(
    rt: Runtime, probe: Probe
) -> None:
    client = Client(rt)
    first = await client.submit("refuses", ticket(1))
    second = await client.submit("gated", ticket(2))
    worker = Worker(rt, concurrency=2)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await client.wait([first], timeout=20)  # failed, dead-lettered; the second starts
        await probe.entered.wait()
        assert await client.resume(first) == 0  # the session is busy: it queues again
        assert await statuses(client, first, second) == [
            WorkflowStatus.QUEUED,
            WorkflowStatus.RUNNING,
        ]
        probe.gate.set()
        done = await client.wait([second], timeout=20)
        with anyio.fail_after(20):
            while probe.calls["refuses"] < 2:  # promoted after the second, and ran again
                await anyio.sleep(0.05)
        final = await client.wait([first], timeout=20)
        worker.stop()
    assert done[second] is WorkflowStatus.COMPLETED
    assert final[first] is WorkflowStatus.FAILED
