"""orchestrator.testing: agents and pipelines in process on no servers; run_until_idle on servers.

Every test here but the two at the end runs with connecting refused (``no_connections``):
the harness needs no Redis, no Postgres, no model server.
"""

from __future__ import annotations

import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
from pydantic import Field

from orchestrator.agents import support
from orchestrator.agents.models import (
    KnowledgeFindings,
    OrderFindings,
    TriageResult,
)
from orchestrator.agents.research import (
    KnowledgeSearchAgent,
    OrderLookupAgent,
    ResearchAgent,
)
from orchestrator.agents.response import ASK_ORDER, CLOSING, REMINDER, ResponseAgent
from orchestrator.agents.ticket import Ticket
from orchestrator.agents.triage import TriageAgent
from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.errors import (
    AgentError,
    ConfigurationError,
    StepLimitReached,
    ToolError,
    WaitTimedOut,
)
from orchestrator.models.llm import ModelRequest, Usage
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.store.memory import Memory
from orchestrator.testing import (
    AgentHarness,
    ModelCall,
    NeedsServers,
    NotCompleted,
    Reply,
    ScriptedModel,
    ScriptError,
    Wait,
)
from tests.conftest import runtime_for

pytestmark = pytest.mark.anyio

DOUBLE = Ticket(
    tenant_id="acme",
    customer_id="cus_1004",
    subject="Charged twice",
    body="I was charged twice for ORD-10007, please refund one of them.",
)
# cus_1003 has two open orders, so the lookups cannot tell which one this is about.
UNCLEAR = Ticket(
    tenant_id="acme",
    customer_id="cus_1003",
    subject="Where is my order?",
    body="My package still has not shipped and I need it this week.",
)
BILLING = {
    "category": "billing",
    "priority": "high",
    "sentiment": "negative",
    "needs_research": True,
    "order_ids": ["ORD-10007"],
    "summary": "Charged twice for ORD-10007.",
}


@pytest.fixture(autouse=True)
def no_connections(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse every socket connection, except in tests on the real servers."""
    if "settings" in request.fixturenames:
        return

    def refuse(sock: socket.socket, address: object) -> None:
        raise AssertionError(f"a harness test tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def triage_result(**changes: Any) -> TriageResult:
    return TriageResult(**{**BILLING, "model": "scripted-model", **changes})


async def past_tickets(query: str, limit: int = 2) -> list[dict[str, Any]]:
    """A fake for search_past_tickets (the real one searches Postgres)."""
    return [{"id": "T-9", "subject": "Double charge", "resolution": "Refunded", "score": 0.8}]


# --- the built-in support agents -----------------------------------------------------------


async def test_connecting_is_refused_here() -> None:
    with socket.socket() as sock, pytest.raises(AssertionError, match="tried to connect"):
        sock.connect(("127.0.0.1", 6379))


async def test_triage_answers_from_the_script_and_routes_to_research() -> None:
    model = ScriptedModel({"triage": BILLING})
    harness = AgentHarness(support.app, model=model)

    result = await harness.run(TriageAgent, {"ticket": DOUBLE})

    assert result.output.category == "billing"
    assert result.output.model == "scripted-model"  # ctx.model.name is the scripted model's
    assert result.next == ("research",)  # route() is None: the pipeline's next agent
    assert result.state["triage"]["order_ids"] == ["ORD-10007"]
    assert result.tool_calls == [] and result.model_calls == 1
    [request] = model.requests
    assert request.purpose == "triage"
    assert "Subject: Charged twice" in request.content
    assert "charged twice for ORD-10007" in request.content
    assert "Classify the category" in request.instructions
    assert request.context["ticket"] == DOUBLE
    model.assert_all_used()


async def test_triage_without_research_hands_straight_to_the_reply() -> None:
    model = ScriptedModel([{**BILLING, "category": "general", "needs_research": False}])
    result = await AgentHarness(support.app, model=model).run(TriageAgent, {"ticket": DOUBLE})
    assert result.next == ("response",)


async def test_triage_with_an_answer_that_does_not_fit_is_a_script_error() -> None:
    model = ScriptedModel({"triage": {"category": "billing"}})
    with pytest.raises(ScriptError, match="does not fit TriageDecision"):
        await AgentHarness(support.app, model=model).run(TriageAgent, {"ticket": DOUBLE})


async def test_research_forks_to_the_lookups_it_needs() -> None:
    harness = AgentHarness(support.app, model=ScriptedModel())
    about_orders = await harness.run(
        ResearchAgent, {"ticket": DOUBLE, "triage": triage_result()}, seq=1
    )
    assert about_orders.output.lookups == ["order_lookup", "knowledge_search"]
    assert about_orders.next == ("order_lookup", "knowledge_search")

    general = triage_result(category="general", order_ids=[])
    other = await harness.run("research", {"ticket": DOUBLE, "triage": general})
    assert other.next == ("knowledge_search",)


async def test_order_lookup_calls_the_fake_tool_under_the_ledger_key() -> None:
    calls: list[dict[str, str]] = []

    async def lookup_order(order_id: str, customer_id: str) -> dict[str, Any] | None:
        calls.append({"order_id": order_id, "customer_id": customer_id})
        return {"order_id": order_id, "status": "delivered"} if order_id == "ORD-10007" else None

    harness = AgentHarness(support.app, tools={"lookup_order": lookup_order})
    triage = triage_result(order_ids=["ORD-10007", "ORD-99999"])
    result = await harness.run(OrderLookupAgent, {"ticket": DOUBLE, "triage": triage}, seq=2)

    assert result.output == OrderFindings(
        orders=[{"order_id": "ORD-10007", "status": "delivered"}], missing_orders=["ORD-99999"]
    )
    assert result.next == ("response",)
    assert calls == [
        {"order_id": "ORD-10007", "customer_id": "cus_1004"},
        {"order_id": "ORD-99999", "customer_id": "cus_1004"},
    ]
    assert [(c.tool, c.args, c.key, c.faked, c.ok) for c in result.tool_calls] == [
        ("lookup_order", calls[0], f"{result.workflow_id}:2:0", True, True),
        ("lookup_order", calls[1], f"{result.workflow_id}:2:1", True, True),
    ]


def past_ticket(key: str, subject: str, customer_id: str = "") -> Memory:
    """A long-term memory as support seeds past tickets (tenant-wide)."""
    meta = {"subject": subject, "resolution": "Refunded"}
    return Memory(0, customer_id, "past_ticket", key, subject, meta, 1.0, None, None, None, 0.0)


async def test_knowledge_search_recalls_past_tickets_from_harness_memory_or_a_fake() -> None:
    state = {"ticket": DOUBLE, "triage": triage_result()}
    result = await AgentHarness(support.app).run(KnowledgeSearchAgent, state)
    assert result.output.similar_tickets == []  # no memory given: nothing recalled

    memory = [past_ticket("T-1", "Shipping delay"), past_ticket("T-9", "Charged twice, refund")]
    result = await AgentHarness(support.app, memory=memory).run(KnowledgeSearchAgent, state)
    assert [t.id for t in result.output.similar_tickets] == ["T-9", "T-1"]
    assert result.output.similar_tickets[0].score > 0.2  # cosine, as the offline reply reads
    [(_, recalled)] = [e for e in result.memory_events if e[0] == "memory.recalled"]
    assert [m["key"] for m in recalled["memories"]] == ["T-9", "T-1"]

    harness = AgentHarness(support.app, tools={"search_past_tickets": past_tickets})
    result = await harness.run(KnowledgeSearchAgent, state)
    assert isinstance(result.output, KnowledgeFindings)
    assert result.output.similar_tickets[0].id == "T-9"
    assert result.output.articles  # search_help_center is not faked: it ran for real
    assert [(c.tool, c.faked) for c in result.tool_calls] == [
        ("search_help_center", False),
        ("search_past_tickets", True),
    ]


def joined_state(ticket: Ticket, *, orders: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The response join's input: the ticket, triage and both lookups' outputs."""
    return {
        "ticket": ticket,
        "triage": triage_result(category="shipping", order_ids=[]),
        "order_lookup": OrderFindings(orders=list(orders), missing_orders=[]),
        "knowledge_search": KnowledgeFindings(articles=[], similar_tickets=[]),
    }


def cite_orders(call: ModelCall) -> dict[str, Any]:
    """A scripted reply drafted from what the agent put in the request's context."""
    research = call.request.context["research"]
    ids = [o["order_id"] for o in research.orders]
    return {"reply": f"About {', '.join(ids)}: on its way.", "citations": ids}


async def test_response_drafts_the_reply_from_both_lookups() -> None:
    model = ScriptedModel({"reply": cite_orders})
    harness = AgentHarness(support.app, model=model)
    order = {"order_id": "ORD-10007", "status": "delivered"}

    result = await harness.run(ResponseAgent, joined_state(DOUBLE, orders=[order]))

    assert result.output.citations == ["ORD-10007"]
    assert result.messages == ["About ORD-10007: on its way."]  # ctx.say: the transcript
    assert result.next == () and result.waits == []
    assert '"order_id": "ORD-10007"' in model.requests[0].content


async def test_response_asks_for_the_order_and_uses_the_scripted_reply() -> None:
    model = ScriptedModel({"reply": cite_orders})
    harness = AgentHarness(support.app, model=model, replies=["Sorry, it is ord-10022"])

    result = await harness.run(ResponseAgent, joined_state(UNCLEAR))

    assert result.output.citations == ["ORD-10022"]
    [asked] = result.waits
    assert (asked.kind, asked.outcome, asked.question) == ("ask", "answered", ASK_ORDER)
    assert asked.payload == "Sorry, it is ord-10022"
    [lookup] = result.tool_calls  # the real lookup_order, on the bundled orders
    assert lookup.args == {"order_id": "ORD-10022", "customer_id": "cus_1003"}
    assert lookup.result["status"] == "processing"


async def test_response_without_a_reply_times_out_to_a_reminder_then_closes() -> None:
    model = ScriptedModel()  # the model is never asked
    result = await AgentHarness(support.app, model=model).run(ResponseAgent, joined_state(UNCLEAR))

    assert result.output.reply == CLOSING
    assert [(w.question, w.outcome) for w in result.waits] == [
        (ASK_ORDER, "timed_out"),
        (REMINDER, "timed_out"),
    ]
    assert result.messages == [CLOSING] and model.calls == []


async def test_the_support_pipeline_runs_end_to_end_on_the_offline_model() -> None:
    harness = AgentHarness(support.app, tools={"search_past_tickets": past_tickets})

    flow = await harness.run_pipeline(None, DOUBLE)

    assert flow.status is WorkflowStatus.COMPLETED, flow.error
    assert flow.agents == ["triage", "research", "order_lookup", "knowledge_search", "response"]
    assert [s.seq for s in flow.steps] == [0, 1, 2, 3, 4]
    assert "ORD-10007" in flow.state["response"]["citations"]
    assert flow.transcript == [flow.state["response"]["reply"]]
    assert flow.step("response").input_state["order_lookup"]["orders"][0]["order_id"] == (
        "ORD-10007"
    )
    concurrent = await harness.run_pipeline("support", DOUBLE, concurrent=True)
    assert concurrent.state == flow.state  # merged in step order: deterministic


async def test_the_support_pipeline_closes_an_unanswered_question_or_takes_the_reply() -> None:
    harness = AgentHarness(support.app, tools={"search_past_tickets": past_tickets})
    closes = await harness.run_pipeline("support", UNCLEAR)
    # The built-in response agent asks with a timeout: with no reply it closes the ticket.
    assert closes.status is WorkflowStatus.COMPLETED
    assert closes.state["response"]["reply"] == CLOSING

    answered = AgentHarness(
        support.app, tools={"search_past_tickets": past_tickets}, replies=["ORD-10022"]
    )
    flow = await answered.run_pipeline("support", UNCLEAR)
    assert flow.status is WorkflowStatus.COMPLETED
    assert "ORD-10022" in flow.state["response"]["citations"]


async def test_unit_runs_take_milliseconds() -> None:
    harness = AgentHarness(support.app, tools={"search_past_tickets": past_tickets})
    tickets = support.sample_tickets()
    started = time.perf_counter()
    flows = [await harness.run_pipeline(None, t) for t in tickets]
    elapsed = time.perf_counter() - started
    assert {f.status for f in flows} == {WorkflowStatus.COMPLETED}
    assert elapsed < 2.0, f"{len(tickets)} pipelines took {elapsed:.3f}s"


# --- tiny agents: tools, waits, forks and joins ---------------------------------------------


class In(AgentInput):
    input: dict[str, Any] = Field(default_factory=dict)


class Out(AgentOutput):
    value: Any = None


def agent(
    name: str,
    body: Any,
    *,
    tools: tuple[str, ...] = (),
    routes: tuple[str, ...] = (),
    to: Sequence[str] | None = None,
    **flags: Any,
) -> type[Agent[In, Out]]:
    """An agent whose run() is ``body(ctx, state)`` and whose route() is ``to``."""

    async def run(self: Any, ctx: StepContext, data: In) -> Out:
        return Out(value=await body(ctx, dict(ctx.state)))

    def route(self: Any, output: Out) -> Sequence[str] | None:
        return to

    attributes = {
        "name": name,
        "input_model": In,
        "output_model": Out,
        "tools": tools,
        "routes": routes,
        "run": run,
        "route": route,
        **flags,
    }
    cls: type[Agent[In, Out]] = type(name.title(), (Agent,), attributes)
    return cls


def tool_app(counter: Counter[str]) -> App:
    app = App("tools-test")

    @app.tool
    async def lookup(value: str) -> dict[str, str]:
        """Look a value up."""
        counter["lookup"] += 1
        return {"looked_up": value}

    @app.tool(idempotent=False)
    async def charge(amount: int, idempotency_key: str) -> dict[str, Any]:
        counter["charge"] += 1
        return {"charged": amount}

    async def pay(ctx: StepContext, state: dict[str, Any]) -> Any:
        return [await ctx.tool("lookup", value="x"), await ctx.tool("charge", amount=5)]

    app.agent(agent("payer", pay, tools=("lookup", "charge")))
    app.agent(agent("sneaky", lambda ctx, s: ctx.tool("charge", amount=1), tools=("lookup",)))

    async def choose(ctx: StepContext, state: dict[str, Any]) -> Any:
        request = ModelRequest("choose", "Look things up, then answer.", "find x")
        return (await ctx.model.parse_with_tools(request, Out, ["lookup"])).value

    async def plain(ctx: StepContext, state: dict[str, Any]) -> Any:
        request = ModelRequest("choose", "Answer.", "x")
        return (await ctx.model.parse(request, Out)).value

    app.agent(agent("chooser", choose, tools=("lookup",)))
    app.agent(agent("plain", plain))
    app.pipeline("pay", ["payer"])
    return app


async def test_a_tool_the_agent_may_not_use_is_refused_even_when_faked() -> None:
    fake_charge = Counter[str]()

    async def charge(amount: int) -> dict[str, int]:
        fake_charge["charge"] += 1
        return {"charged": amount}

    harness = AgentHarness(tool_app(Counter()), tools={"charge": charge})
    with pytest.raises(ToolError, match="may not use tool 'charge'"):
        await harness.run("sneaky", {})
    assert fake_charge == Counter()


async def test_a_non_idempotent_tool_needs_servers_unless_faked() -> None:
    counter: Counter[str] = Counter()
    app = tool_app(counter)
    with pytest.raises(NeedsServers, match="'charge' is not idempotent"):
        await AgentHarness(app).run("payer", {})
    assert counter == Counter({"lookup": 1})

    keys: list[str] = []

    async def charge(amount: int, idempotency_key: str) -> dict[str, Any]:
        keys.append(idempotency_key)
        return {"charged": amount, "fake": True}

    result = await AgentHarness(app, tools={"charge": charge}).run("payer", {}, seq=3)
    assert result.output.value == [{"looked_up": "x"}, {"charged": 5, "fake": True}]
    assert keys == [f"{result.workflow_id}:3:1"]  # the ledger's key, as a worker gives it
    assert [(c.tool, c.faked) for c in result.tool_calls] == [("lookup", False), ("charge", True)]


async def test_a_fake_for_a_tool_the_app_lacks_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="no tool of that name"):
        AgentHarness(tool_app(Counter()), tools={"refund": past_tickets})


async def test_the_scripted_model_calls_tools_through_the_ledger() -> None:
    model = ScriptedModel(
        [
            Reply(
                lambda call: {"value": call.tool_results[0].result["looked_up"]},
                tool_calls=[("lookup", {"value": "x"})],
                usage=Usage(11, 7),
            )
        ]
    )
    result = await AgentHarness(tool_app(Counter()), model=model).run("chooser", {})

    assert result.output.value == "x"
    assert result.usage == Usage(11, 7)
    [call] = model.calls
    assert call.tools == ("lookup",)  # what parse_with_tools offered
    [ran] = result.tool_calls
    assert (ran.tool, ran.args, ran.key) == ("lookup", {"value": "x"}, f"{result.workflow_id}:0:0")


async def test_tool_calls_need_parse_with_tools_and_an_exhausted_script_fails_clearly() -> None:
    app = tool_app(Counter())
    calls_tools = ScriptedModel([Reply({"value": 1}, tool_calls=[("lookup", {"value": "x"})])])
    with pytest.raises(AgentError, match="offered none"):
        await AgentHarness(app, model=calls_tools).run("plain", {})

    with pytest.raises(ScriptError, match="no answer left for request 1"):
        await AgentHarness(app, model=ScriptedModel()).run("plain", {})

    failing = ScriptedModel([AgentError("model unavailable")])
    with pytest.raises(AgentError, match="model unavailable"):
        await AgentHarness(app, model=failing).run("plain", {})


def waits_app() -> App:
    app = App("waits-test")

    async def ask(ctx: StepContext, state: dict[str, Any]) -> Any:
        return ctx.ask("Which order?")

    async def approve(ctx: StepContext, state: dict[str, Any]) -> Any:
        await ctx.sleep(3600)
        try:
            return await ctx.wait_for("approval", timeout=60)
        except WaitTimedOut:
            return "no answer"

    async def hold(ctx: StepContext, state: dict[str, Any]) -> Any:
        return await ctx.wait_for("go")

    app.agent(agent("asker", ask))
    app.agent(agent("approver", approve))
    app.agent(agent("holder", hold))
    app.pipeline("asking", ["asker", "approver"])
    return app


async def test_an_ask_without_a_scripted_reply_parks_and_with_one_returns_it() -> None:
    app = waits_app()
    parked = await AgentHarness(app).run("asker", {})
    assert not parked.completed
    assert parked.parked == Wait("asker", "ask", "parked", "input", "Which order?")
    with pytest.raises(NotCompleted, match="parked on ask 'Which order\\?'"):
        parked.output  # noqa: B018

    answered = await AgentHarness(app, replies=["ORD-1"]).run("asker", {})
    assert answered.output.value == "ORD-1"

    flow = await AgentHarness(app).run_pipeline("asking", {})
    assert flow.status is WorkflowStatus.WAITING
    assert flow.waiting is not None and flow.waiting.question == "Which order?"
    assert flow.agents == ["asker"]


async def test_sleep_returns_at_once_and_wait_for_takes_the_scripted_signal() -> None:
    app = waits_app()
    started = time.perf_counter()
    signalled = await AgentHarness(app, signals={"approval": {"ok": True}}).run("approver", {})
    assert time.perf_counter() - started < 1.0  # the hour's sleep did not happen
    assert signalled.output.value == {"ok": True}
    assert [(w.kind, w.outcome, w.seconds) for w in signalled.waits] == [
        ("sleep", "slept", 3600),
        ("signal", "answered", 60),
    ]

    timed_out = await AgentHarness(app).run("approver", {})
    assert timed_out.output.value == "no answer"
    assert timed_out.waits[-1].outcome == "timed_out"

    parked = await AgentHarness(app).run("holder", {})  # no timeout, no signal: parks
    assert parked.parked == Wait("holder", "signal", "parked", "go")
    two = await AgentHarness(app, signals=[("go", 1), ("go", 2)]).run("holder", {})
    assert two.output.value == 1  # each run starts from the scripted signals afresh

    flow = await AgentHarness(app, replies=["ORD-1"]).run_pipeline("asking", {})
    assert flow.status is WorkflowStatus.COMPLETED
    assert flow.state["asker"] == {"value": "ORD-1"}


class Rendezvous:
    """Two branches that each wait a moment for the other: both meet only if run at once."""

    def __init__(self) -> None:
        self.arrived = {"left": anyio.Event(), "right": anyio.Event()}
        self.met: dict[str, bool] = {}

    async def meet(self, me: str, other: str) -> None:
        self.arrived[me].set()
        with anyio.move_on_after(0.2):
            await self.arrived[other].wait()
        self.met[me] = self.arrived[other].is_set()


def fork_app(
    meeting: Rendezvous | None = None, *, optional: bool = False, right_fails: bool = False
) -> App:
    app = App("fork-test")
    seen = Counter[str]()

    @app.tool
    async def lookup(value: str) -> dict[str, str]:
        seen[value] += 1
        return {"looked_up": value}

    async def start(ctx: StepContext, state: dict[str, Any]) -> Any:
        return "started"

    async def left(ctx: StepContext, state: dict[str, Any]) -> Any:
        if meeting is not None:
            await meeting.meet("left", "right")
        return (await ctx.tool("lookup", value="l"))["looked_up"]

    async def right(ctx: StepContext, state: dict[str, Any]) -> Any:
        if meeting is not None:
            await meeting.meet("right", "left")
        if right_fails:
            raise AgentError("right is broken", non_retryable=True)
        return "r"

    async def merge(ctx: StepContext, state: dict[str, Any]) -> Any:
        got = [state.get(name, {}).get("value") for name in ("start", "left", "right")]
        return {"got": got, "errors": sorted(state.get("branch_errors", {}))}

    app.agent(agent("start", start, routes=("left", "right"), to=["left", "right"]))
    app.agent(agent("left", left, tools=("lookup",), routes=("merge",), to=["merge"]))
    app.agent(agent("right", right, routes=("merge",), to=["merge"]))
    app.agent(agent("merge", merge, join=True, optional_branches=optional))
    app.pipeline("fork", ["start", "merge"])
    return app


async def test_a_fork_runs_both_branches_and_the_join_once_on_the_merged_state() -> None:
    flow = await AgentHarness(fork_app()).run_pipeline("fork", {"n": 1})

    assert flow.status is WorkflowStatus.COMPLETED, flow.error
    assert flow.agents == ["start", "left", "right", "merge"]
    assert [s.seq for s in flow.steps] == [0, 1, 2, 3]
    assert flow.state["merge"]["value"] == {"got": ["started", "l", "r"], "errors": []}
    assert flow.step("left").state.keys() == {"input", "start", "left"}  # each branch's own
    assert flow.state["input"] == {"n": 1}


async def test_concurrent_branches_run_at_once() -> None:
    meeting = Rendezvous()
    flow = await AgentHarness(fork_app(meeting)).run_pipeline("fork", {}, concurrent=True)
    assert flow.status is WorkflowStatus.COMPLETED, flow.error
    assert flow.state["merge"]["value"]["got"] == ["started", "l", "r"]
    assert meeting.met == {"left": True, "right": True}

    one_by_one = Rendezvous()
    flow = await AgentHarness(fork_app(one_by_one)).run_pipeline("fork", {})
    assert flow.status is WorkflowStatus.COMPLETED, flow.error
    assert one_by_one.met == {"left": False, "right": True}  # left ran alone first


async def test_a_failed_branch_fails_the_workflow_unless_the_join_tolerates_it() -> None:
    failed = await AgentHarness(fork_app(right_fails=True)).run_pipeline("fork", {})
    assert failed.status is WorkflowStatus.FAILED
    assert isinstance(failed.error, AgentError) and "right is broken" in str(failed.error)
    assert "merge" not in failed.agents

    tolerated = await AgentHarness(fork_app(optional=True, right_fails=True)).run_pipeline(
        "fork", {}
    )
    assert tolerated.status is WorkflowStatus.COMPLETED
    assert tolerated.state["merge"]["value"] == {"got": ["started", "l", None], "errors": ["right"]}
    assert "right is broken" in tolerated.state["branch_errors"]["right"]


async def test_a_failed_step_is_retried_with_its_recorded_tool_results() -> None:
    app = App("retry-test")
    seen: Counter[str] = Counter()

    @app.tool
    async def lookup(value: str) -> dict[str, str]:
        seen["lookup"] += 1
        return {"looked_up": value}

    async def flaky(ctx: StepContext, state: dict[str, Any]) -> Any:
        found = await ctx.tool("lookup", value="v")
        seen["runs"] += 1
        if seen["runs"] == 1:
            raise RuntimeError("transient failure after the tool ran")
        return found["looked_up"]

    app.agent(agent("flaky", flaky, tools=("lookup",)))
    app.agent(agent("once", flaky, tools=("lookup",), max_attempts=1))
    app.pipeline("flaky", ["flaky"])
    app.pipeline("once", ["once"])

    flow = await AgentHarness(app).run_pipeline("flaky", {})
    assert flow.status is WorkflowStatus.COMPLETED
    assert flow.step("flaky").attempts == 2
    assert seen == Counter({"lookup": 1, "runs": 2})  # the recorded result was reused

    seen.clear()
    once = await AgentHarness(app).run_pipeline("once", {})
    assert once.status is WorkflowStatus.FAILED and isinstance(once.error, RuntimeError)


async def test_a_routing_loop_stops_at_the_step_limit() -> None:
    app = App("loop-test")

    async def again(ctx: StepContext, state: dict[str, Any]) -> Any:
        return ctx.info.seq

    app.agent(agent("looper", again, routes=("looper",), to=["looper"]))
    app.pipeline("loop", ["looper"], max_steps=5)

    flow = await AgentHarness(app).run_pipeline("loop", {})

    assert flow.status is WorkflowStatus.FAILED
    assert isinstance(flow.error, StepLimitReached)
    assert [s.seq for s in flow.steps] == [0, 1, 2, 3, 4]  # five steps; the fifth's routing fails
    assert flow.state["looper"] == {"value": 3}


# --- Worker.run_until_idle on the real servers -------------------------------------------


def idle_app(gate: anyio.Event, tries: Counter[str]) -> App:
    app = App("idle-test", version="test")
    app.include(support.app)

    async def nap(ctx: StepContext, state: dict[str, Any]) -> Any:
        await ctx.sleep(0.3)  # a durable timer: run_until_idle waits for it
        return "rested"

    async def flaky(ctx: StepContext, state: dict[str, Any]) -> Any:
        tries["flaky"] += 1
        if tries["flaky"] == 1:
            raise RuntimeError("transient")  # retried after retry_base_seconds
        return "steady"

    async def blocked(ctx: StepContext, state: dict[str, Any]) -> Any:
        await gate.wait()
        return "released"

    app.agent(agent("napper", nap))
    app.agent(agent("flaky", flaky))
    app.agent(agent("blocked", blocked))
    app.pipeline("nap", ["napper"])
    app.pipeline("flaky", ["flaky"])
    app.pipeline("blocked", ["blocked"])
    return app


@pytest.fixture
async def idle_rt(settings: Settings) -> AsyncIterator[tuple[Runtime, anyio.Event, Counter[str]]]:
    gate, tries = anyio.Event(), Counter[str]()
    quick = settings.model_copy(
        update={"timer_interval_seconds": 0.1, "shutdown_grace_seconds": 0.2}
    )
    async with runtime_for(quick, idle_app(gate, tries)) as rt:
        yield rt, gate, tries
    gate.set()


async def test_run_until_idle_drains_the_queues(
    idle_rt: tuple[Runtime, anyio.Event, Counter[str]],
) -> None:
    rt, _, tries = idle_rt
    client = Client(rt)
    tickets = [await client.submit("support", t) for t in support.sample_tickets()[:3]]
    unclear = await client.submit("support", UNCLEAR)
    nap = await client.submit("nap", {})
    flaky = await client.submit("flaky", {})
    worker = Worker(rt, concurrency=4, reconcile=False)

    await worker.run_until_idle(timeout=60)

    for wid in [*tickets, nap, flaky]:
        assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    assert tries["flaky"] == 2  # the retry was waited for, and so was the nap's timer
    # Asking with a day's reminder timer: parked past the deadline, so idle.
    waiting = await client.get(unclear)
    assert waiting.status is WorkflowStatus.WAITING
    assert waiting.steps[-1].agent == "response"

    await client.provide_input(unclear, "It is ORD-10022")
    await worker.run_until_idle(timeout=60)  # the same worker again
    done = await client.get(unclear)
    assert done.status is WorkflowStatus.COMPLETED
    assert "ORD-10022" in done.state["response"]["citations"]


async def test_run_until_idle_does_not_return_while_a_step_runs(
    idle_rt: tuple[Runtime, anyio.Event, Counter[str]],
) -> None:
    rt, _, _ = idle_rt
    await Client(rt).submit("blocked", {})
    worker = Worker(rt, reconcile=False)
    with pytest.raises(TimeoutError, match=r"not idle after 1s: .*queued step"):
        await worker.run_until_idle(timeout=1)
