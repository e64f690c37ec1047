"""Transcripts read back, tenant-scoped in storage: a returning customer's next ticket
sees the earlier conversation; another tenant's customer of the same id sees none of it.
Recalls are recorded on the step that made them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.coordination import working_memory as wm
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.schemas.memory import Line
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.store.transcripts import TranscriptStore
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio


class Ticket(BaseModel):
    text: str
    recall: str = ""


class TicketIn(AgentInput):
    input: Ticket


class Out(AgentOutput):
    value: str


def build_app(seen: dict[str, list[Line]]) -> App:
    app = App("transcript-test", version="test")

    @app.agent
    class Support(Agent[TicketIn, Out]):
        name = "support"
        input_model = TicketIn
        output_model = Out

        async def run(self, ctx: StepContext, data: TicketIn) -> Out:
            seen[data.input.text] = await ctx.memory.transcript(limit=20)
            if data.input.recall:
                found = await ctx.memory.recall(data.input.recall, k=2)
                ctx.say("recalled " + ", ".join(m.key for m in found))
            ctx.say(f"answered {data.input.text}")
            return Out(value="ok")

    app.pipeline("support", ["support"], input_model=Ticket)
    app.validate()
    return app


@pytest.fixture
def seen() -> dict[str, list[Line]]:
    return {}


@pytest.fixture
async def rt(settings: Settings, seen: dict[str, list[Line]]) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(seen)) as runtime:
        yield runtime


async def _ticket(rt: Runtime, ticket: Ticket, *, tenant: str, session: str, customer: str) -> UUID:
    client = Client(rt)
    wid = await client.submit("support", ticket, tenant=tenant, session=session, customer=customer)
    await Worker(rt, concurrency=1).run_until_idle(timeout=20)
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED, (await client.get(wid)).error
    return wid


async def _hydrated(rt: Runtime, wid: UUID) -> dict[str, Any]:
    [row] = await fetch(
        rt, "SELECT data FROM events WHERE workflow_id = $1 AND type = 'memory.hydrated'", wid
    )
    data: dict[str, Any] = row["data"]
    return data


async def test_returning_customer_sees_the_earlier_ticket_other_tenant_sees_nothing(
    rt: Runtime, seen: dict[str, list[Line]]
) -> None:
    await _ticket(rt, Ticket(text="wifi drops"), tenant="t1", session="t1-a", customer="c-7")
    # The same customer comes back with a new ticket, in a new session.
    wid = await _ticket(rt, Ticket(text="wifi again"), tenant="t1", session="t1-b", customer="c-7")
    lines = seen["wifi again"]
    assert [(m.role, m.author) for m in lines] == [
        ("customer", "c-7"),
        ("agent", "support"),
        ("customer", "c-7"),
    ]
    assert "wifi drops" in lines[0].content and lines[1].content == "answered wifi drops"
    assert "wifi again" in lines[2].content
    assert (await _hydrated(rt, wid))["sessions"] == 2

    # Another tenant's customer with the same id: its own message only.
    await _ticket(rt, Ticket(text="billing"), tenant="t2", session="t2-a", customer="c-7")
    assert [m.content for m in seen["billing"]] == ["text='billing' recall=''"]

    # The store, read directly: scoped by tenant in storage, latest first then ordered.
    store = TranscriptStore(rt.db)
    mine = await store.recent_for_customer(tenant_id="t1", customer_id="c-7", limit=3)
    assert [m.content for m in mine] == [
        "answered wifi drops",
        "text='wifi again' recall=''",
        "answered wifi again",
    ]
    assert {m.session_id for m in mine} == {"t1-a", "t1-b"}
    theirs = await store.recent_for_customer(tenant_id="t2", customer_id="c-7", limit=50)
    assert {m.session_id for m in theirs} == {"t2-a"}
    # A session id of another tenant reads as empty.
    assert await store.recent_for_session(tenant_id="t2", session_id="t1-a", limit=50) == []


async def test_recall_is_recorded_on_the_step_and_kept_in_working_memory(rt: Runtime) -> None:
    embedder = rt.embedder
    for key, text in [("printer", "customer prefers email about the printer"),
                      ("refund", "refund issued for order 42")]:  # fmt: skip
        await rt.store.memory.remember(
            tenant_id="t1",
            customer_id="c-9",
            kind="fact",
            key=key,
            content=text,
            metadata={},
            embedder=embedder.name,
            embedding=await embedder.embed(text),
        )
    ticket = Ticket(text="printer broke", recall="printer email")
    wid = await _ticket(rt, ticket, tenant="t1", session="t1-r", customer="c-9")

    [row] = await fetch(
        rt, "SELECT data FROM events WHERE workflow_id = $1 AND type = 'memory.recalled'", wid
    )
    record = row["data"]
    assert record["query"] == "printer email" and record["cached"] is False
    assert record["memories"][0]["key"] == "printer"
    assert all(isinstance(m["score"], float) for m in record["memories"])
    stored = await wm.load(rt.redis, rt.keys, "t1", "t1-r")
    assert stored is not None and stored.recalled[0].content.startswith("customer prefers")
