"""The support pipeline end to end on real Redis and Postgres."""

from __future__ import annotations

import pytest

from orchestrator.agents.support import sample_tickets
from orchestrator.cli.demo import returning_inputs, run_local
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from tests.conftest import fetch

pytestmark = pytest.mark.anyio


async def test_sample_tickets_complete_with_triage_research_and_reply(support: Runtime) -> None:
    tickets = sample_tickets()
    assert len(tickets) >= 10
    returning = returning_inputs(support.app.resolve_pipeline(None))
    report = await run_local(support, tickets, concurrency=4, timeout=60, then=returning)

    assert [r.status for r in report.all] == [WorkflowStatus.COMPLETED] * (len(tickets) + 2)
    # First contact: nothing remembered. Coming back after consolidation: recognised, with
    # the earlier issue and the preference they stated cited from long-term memory.
    assert all(not r.state["remembered"] for r in report.records if "remembered" in r.state)
    back = {r.state["ticket"]["customer_id"]: r.state for r in report.returning}
    assert set(back) == {"cus_1004", "cus_1010"}
    for state in back.values():
        assert state["response"]["reply"].count("Welcome back!") == 1
        summary = next(m for m in state["remembered"] if m["kind"] == "summary")
        assert f"memory:{summary['id']}" in state["response"]["citations"]
        assert state["research"]["earlier_messages"] >= 2  # the first ticket and its reply
    assert "please don't call me" in back["cus_1004"]["response"]["reply"]
    assert "don't call" not in back["cus_1010"]["response"]["reply"]  # another customer's

    for record in report.records:
        state = record.state
        assert state["triage"]["model"].startswith("offline-rules")
        assert state["response"]["reply"].startswith(f"Hi {state['ticket']['customer_id']}")
        assert [s.agent for s in record.steps][-1] == "response"
        assert all(s.status == "completed" and s.attempt == 1 for s in record.steps)

    double_charge = next(r for r in report.records if "ORD-10007" in r.state["ticket"]["body"])
    assert double_charge.state["triage"]["category"] == "billing"
    assert double_charge.state["research"]["lookups"] == ["order_lookup", "knowledge_search"]
    assert [o["order_id"] for o in double_charge.state["order_lookup"]["orders"]] == ["ORD-10007"]
    # Research forked into two parallel lookups; the response joined them, once.
    agents = [s.agent for s in double_charge.steps]
    assert sorted(agents[2:4]) == ["knowledge_search", "order_lookup"]
    assert agents[:2] == ["triage", "research"] and agents[4:] == ["response"]
    assert len({s.seq for s in double_charge.steps}) == len(double_charge.steps)
    assert "ORD-10007" in double_charge.state["response"]["citations"]
    assert "refunded" in double_charge.state["response"]["reply"]

    angry = next(r for r in report.records if r.state["ticket"]["subject"].isupper())
    assert angry.state["triage"]["sentiment"] == "angry"
    assert angry.state["triage"]["priority"] == "urgent"


async def test_every_milestone_is_recorded_once_in_postgres(support: Runtime) -> None:
    report = await run_local(support, sample_tickets()[:3], concurrency=2, timeout=60)
    wid = report.records[0].id

    attempts = await fetch(
        support,
        """
        SELECT s.agent, count(a.*) AS n FROM steps s JOIN step_attempts a ON a.step_id = s.id
        WHERE s.workflow_id = $1 GROUP BY s.agent""",
        wid,
    )
    assert {r["agent"]: r["n"] for r in attempts} == {
        "triage": 1,
        "research": 1,
        "order_lookup": 1,
        "knowledge_search": 1,
        "response": 1,
    }

    checkpoints = await fetch(
        support,
        "SELECT seq, agent, state FROM checkpoints WHERE workflow_id = $1 ORDER BY seq",
        wid,
    )
    assert [c["agent"] for c in checkpoints][:2] == ["triage", "research"]
    assert [c["agent"] for c in checkpoints][-1] == "response"
    # Each checkpoint holds what its step changed; folded over the input, the final state.
    assert checkpoints[-1]["state"] == {"response": checkpoints[-1]["state"]["response"]}
    [workflow] = await fetch(support, "SELECT input, state FROM workflows WHERE id = $1", wid)
    folded = dict(workflow["input"])
    for checkpoint in checkpoints:
        folded.update(checkpoint["state"])
    assert folded == workflow["state"]
    assert set(folded) == {
        "ticket",
        "triage",
        "research",
        "remembered",
        "order_lookup",
        "knowledge_search",
        "response",
    }

    runs = await fetch(
        support,
        "SELECT s.seq, t.idempotency_key, t.tool, t.status FROM tool_runs t "
        "JOIN steps s ON s.id = t.step_id WHERE t.workflow_id = $1 ORDER BY s.seq, t.ordinal",
        wid,
    )
    assert runs and all(r["status"] == "succeeded" for r in runs)
    assert runs[0]["idempotency_key"] == f"{wid}:{runs[0]['seq']}:0"

    transcript = await fetch(
        support,
        """
        SELECT m.role FROM messages m JOIN workflows w ON w.session_id = m.session_id
        WHERE w.id = $1 ORDER BY m.id""",
        wid,
    )
    assert [m["role"] for m in transcript] == ["customer", "agent"]

    events = await fetch(support, "SELECT type FROM events WHERE workflow_id = $1 ORDER BY id", wid)
    types = [e["type"] for e in events]
    assert types[:6] == [
        "workflow.submitted",
        "step.completed",  # triage
        "step.completed",  # research
        "memory.recalled",  # research recalled the customer's memories
        "memory.hydrated",  # and read the transcript (working memory was built)
        "workflow.forked",  # into order_lookup and knowledge_search
    ]
    # The two lookups end in either order; knowledge_search recalled past tickets.
    assert sorted(types[6:9]) == ["memory.recalled", "step.completed", "step.completed"]
    assert types[9:] == [
        "workflow.join_started",  # response, once
        "step.completed",
        "workflow.completed",
    ]


async def test_vague_ticket_skips_research_and_asks_for_details(support: Runtime) -> None:
    vague = next(t for t in sample_tickets() if t.body == "it doesn't work")
    report = await run_local(support, [vague], timeout=30)
    record = report.records[0]
    assert [s.agent for s in record.steps] == ["triage", "response"]
    assert "could you tell me" in record.state["response"]["reply"]


async def test_a_session_id_cannot_cross_tenants(support: Runtime) -> None:
    from orchestrator.agents.ticket import Ticket
    from orchestrator.client import Client
    from orchestrator.errors import InvalidInput

    client = Client(support)
    shared = {"customer_id": "c1", "subject": "s", "body": "b", "session_id": "s-1"}
    await client.submit(None, Ticket(tenant_id="acme", **shared))
    await client.submit(None, Ticket(tenant_id="acme", **shared))  # same tenant: same session
    with pytest.raises(InvalidInput, match="belongs to another tenant"):
        await client.submit(None, Ticket(tenant_id="globex", **shared))
    rows = await fetch(support, "SELECT tenant_id FROM workflows WHERE session_id = 's-1'")
    assert [r["tenant_id"] for r in rows] == ["acme", "acme"]
