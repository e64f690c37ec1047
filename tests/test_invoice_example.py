"""examples/invoice_review.py on the real servers: a fork into two checks, a join, a
person's approval (a durable wait for a signal), and a payment made exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import pytest

from examples import invoice_review
from examples.invoice_review import BANK, app
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.testing import AgentHarness
from tests.conftest import fetch, runtime_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.anyio
LARGE: dict[str, Any] = json.loads((ROOT / "examples" / "invoice.json").read_text())
SMALL: dict[str, Any] = {
    "number": "inv-88",
    "vendor": "  Contoso   Office ",
    "amount": "240.50",
    "currency": "USD",
    "issued": "2026-11-10",
    "lines": [
        {"description": "Paper", "quantity": "10", "unit_price": "4.05"},
        {"description": "Toner", "quantity": "2", "unit_price": "100"},
    ],
}


@pytest.fixture(autouse=True)
def bank() -> Iterator[None]:
    BANK.reset()
    yield
    BANK.reset()


@pytest.fixture
async def invoices(settings: Settings) -> AsyncIterator[Runtime]:
    fast = settings.model_copy(update={"timer_interval_seconds": 0.05})
    async with runtime_for(fast, app) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def running(runtime: Runtime) -> AsyncIterator[Client]:
    """An in-process worker for every agent of the app, stopped on the way out."""
    worker = Worker(runtime, concurrency=4, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            yield Client(runtime)
        finally:
            worker.stop()


async def until(client: Client, wid: UUID, status: WorkflowStatus) -> None:
    with anyio.fail_after(10):
        while (await client.get(wid)).status is not status:
            await anyio.sleep(0.02)


async def finished(client: Client, wid: UUID) -> dict[str, Any]:
    statuses = await client.wait([wid], timeout=10)
    record = await client.get(wid)
    assert statuses[wid] is WorkflowStatus.COMPLETED, record.error
    return record.state


async def pay_runs(runtime: Runtime, wid: UUID) -> list[str]:
    rows = await fetch(
        runtime, "SELECT status FROM tool_runs WHERE workflow_id = $1 AND tool = 'pay'", wid
    )
    return [r["status"] for r in rows]


async def test_a_small_invoice_is_paid_without_approval(invoices: Runtime) -> None:
    async with running(invoices) as client:
        wid = await client.submit("invoice", SMALL)
        state = await finished(client, wid)
        steps = [s.agent for s in (await client.get(wid)).steps]
    # The two checks ran as parallel branches (in either order), joined once by decide.
    assert steps[0] == "extract" and steps[3:] == ["decide", "pay"]
    assert sorted(steps[1:3]) == ["duplicate_check", "policy_check"]
    assert state["extract"]["vendor"] == "contoso office"
    assert state["extract"]["amount_eur"] == "221.26"
    assert state["decide"] == {"action": "pay", "reasons": []}
    assert state["pay"]["approved_by"] is None
    assert BANK.calls == 1 and len(BANK.payments) == 1
    assert await pay_runs(invoices, wid) == ["succeeded"]


async def test_a_large_invoice_waits_for_approval_then_pays_once(invoices: Runtime) -> None:
    async with running(invoices) as client:
        wid = await client.submit("invoice", LARGE)
        await until(client, wid, WorkflowStatus.WAITING)
        waiting = await client.get(wid)
        assert [(s.agent, s.status.value) for s in waiting.steps][-2:] == [
            ("decide", "completed"),
            ("approval", "waiting"),
        ]
        assert BANK.calls == 0
        assert await client.signal(wid, "approval", {"ok": True, "by": "dana"}) is True
        state = await finished(client, wid)
    assert state["approval"] == {"approved": True, "by": "dana", "note": ""}
    assert state["pay"]["approved_by"] == "dana"
    assert state["pay"]["payment_id"] == "pay-00001"
    assert BANK.calls == 1
    assert await pay_runs(invoices, wid) == ["succeeded"]
    # A late, second approval is refused: the workflow is over and paid once.
    with pytest.raises(InvalidInput, match="is completed; it takes no signals"):
        await client.signal(wid, "approval", {"ok": True, "by": "eve"})
    assert BANK.calls == 1


async def test_a_rejected_invoice_is_never_paid(invoices: Runtime) -> None:
    async with running(invoices) as client:
        wid = await client.submit("invoice", LARGE)
        await until(client, wid, WorkflowStatus.WAITING)
        # Unreadable first (ignored, the step waits again), then a real answer.
        assert await client.signal(wid, "approval", "looks fine?") is True
        await until(client, wid, WorkflowStatus.WAITING)
        await client.signal(wid, "approval", {"ok": False, "by": "dana", "note": "not ours"})
        state = await finished(client, wid)
        record = await client.get(wid)
    assert state["approval"] == {"approved": False, "by": "dana", "note": "not ours"}
    assert "pay" not in state and [s.agent for s in record.steps][-1] == "approval"
    assert BANK.calls == 0
    transcript = await fetch(
        invoices,
        "SELECT content FROM messages WHERE workflow_id = $1 AND role = 'agent' ORDER BY id",
        wid,
    )
    assert [m["content"] for m in transcript] == [
        "Ignored an unreadable approval signal: 'looks fine?'.",
        "Invoice INV-2026-0147 rejected by dana.",
    ]


async def test_no_answer_in_time_rejects(
    invoices: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(invoice_review, "APPROVAL_TIMEOUT", timedelta(seconds=0.3))
    async with running(invoices) as client:
        wid = await client.submit("invoice", LARGE)
        state = await finished(client, wid)  # woken by the timer, WaitTimedOut caught
    assert state["approval"]["approved"] is False
    assert state["approval"]["note"].startswith("no answer within")
    assert BANK.calls == 0


async def test_an_approval_sent_before_the_wait_is_kept(invoices: Runtime) -> None:
    async with running(invoices) as client:
        wid = await client.submit("invoice", LARGE)
        # Sent at once: most likely before the approval step exists; kept either way.
        await client.signal(wid, "approval", {"ok": True, "by": "dana"})
        state = await finished(client, wid)
    assert state["pay"]["approved_by"] == "dana"
    assert BANK.calls == 1


async def test_policy_failures_and_duplicates_are_rejected_without_a_person(
    invoices: Runtime,
) -> None:
    blocked = {**SMALL, "vendor": "Shady Supplies Ltd", "amount": "999.00"}
    async with running(invoices) as client:
        first = await client.submit("invoice", SMALL)
        await finished(client, first)
        again = await client.submit("invoice", {**SMALL, "number": "INV-88"})
        refused = await client.submit("invoice", blocked)
        duplicate, bad = await finished(client, again), await finished(client, refused)
    assert duplicate["decide"] == {"action": "reject", "reasons": ["already paid as pay-00001"]}
    assert bad["decide"]["action"] == "reject"
    assert bad["decide"]["reasons"] == [
        "vendor 'Shady Supplies Ltd' is blocked",
        "lines add up to 240.50, not 999.00",
    ]
    assert BANK.calls == 1


async def test_a_check_that_fails_for_good_sends_the_invoice_to_a_person(
    invoices: Runtime,
) -> None:
    BANK.down = True  # duplicate_check's lookup fails on every attempt
    async with running(invoices) as client:
        wid = await client.submit("invoice", SMALL)
        await until(client, wid, WorkflowStatus.WAITING)
        decision = (await client.get(wid)).state["decide"]
        assert decision["action"] == "approve"
        assert decision["reasons"] == [
            "duplicate_check did not finish: ToolError: tool 'find_payment' failed: "
            "ConnectionError: the bank is unreachable"
        ]
        BANK.down = False
        await client.signal(wid, "approval", {"ok": True, "by": "dana"})
        state = await finished(client, wid)
    assert state["pay"]["approved_by"] == "dana"
    assert BANK.calls == 1


async def test_the_cli_signal_verb_resumes_the_workflow(invoices: Runtime) -> None:
    settings = invoices.settings
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
        "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
        "PYTHONPATH": str(ROOT),  # as `orchestrator --app examples...` is run from the root
    }
    async with running(invoices) as client:
        wid = await client.submit("invoice", LARGE)
        await until(client, wid, WorkflowStatus.WAITING)
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    str(Path(sys.executable).parent / "orchestrator"),  # the console script
                    "--app",
                    "examples.invoice_review:app",
                    "signal",
                    str(wid),
                    "approval",
                    '{"ok": true, "by": "dana"}',
                ],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
        assert result.returncode == 0, result.stderr
        assert "delivered" in result.stdout
        state = await finished(client, wid)
    assert state["pay"]["approved_by"] == "dana"
    assert BANK.calls == 1


async def test_the_pipeline_runs_in_the_test_kit_without_servers() -> None:
    async def fake_pay(
        vendor: str, invoice_number: str, amount: str, currency: str
    ) -> dict[str, str]:
        return {"payment_id": "pay-test"}

    approved = {"approval": {"ok": True, "by": "dana"}}
    harness = AgentHarness(app, tools={"pay": fake_pay}, signals=approved)
    flow = await harness.run_pipeline("invoice", LARGE)
    assert flow.status is WorkflowStatus.COMPLETED
    assert flow.agents[-3:] == ["decide", "approval", "pay"]
    assert flow.state["pay"]["approved_by"] == "dana"
    assert [c.tool for c in flow.tool_calls] == ["find_payment", "pay"]
    assert BANK.calls == 0  # the fake paid

    # Nothing scripted for a wait with a timeout: the harness times it out at once.
    unanswered = await AgentHarness(app).run_pipeline("invoice", LARGE)
    assert unanswered.status is WorkflowStatus.COMPLETED
    assert unanswered.state["approval"]["approved"] is False
    assert unanswered.agents[-1] == "approval"
