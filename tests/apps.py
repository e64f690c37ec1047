"""Small apps for protocol tests: a gated agent, a flaky agent and counting tools."""

from __future__ import annotations

from collections import Counter

import anyio

from orchestrator.agents.ticket import Ticket
from orchestrator.app import App
from orchestrator.errors import AgentError
from orchestrator.models.llm import ModelRequest
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext


class TicketIn(AgentInput):
    ticket: Ticket


class Done(AgentOutput):
    value: str


class Probe:
    """Shared, per-test state the agents and tools report into."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.gate = anyio.Event()
        self.entered = anyio.Event()
        self.failures_left = 0
        self.cancel_seen: bool | None = None
        # What the refund tool's reconcile check answers for an in-doubt call.
        self.refund_found: dict[str, object] | None = None
        # What the wire tool raises on its next calls (popped one per call), and the
        # fencing tokens the fenced_put tool was given.
        self.wire_errors: list[Exception] = []
        self.tokens: list[int] = []


def build_app(probe: Probe) -> App:
    app = App("protocol-test", version="test")
    _tools(app, probe)
    _agents(app, probe)
    app.pipeline("gated", ["gated"], input_key="ticket")
    app.pipeline("chooser", ["chooser"], input_key="ticket")
    app.pipeline("refuses", ["refuses"], input_key="ticket")
    app.pipeline("two_steps", ["gated", "flaky"], input_key="ticket")
    app.pipeline("flaky", ["flaky"], input_key="ticket")
    app.pipeline("refunder", ["refunder"], input_key="ticket")
    app.validate()
    return app


def _tools(app: App, probe: Probe) -> None:

    @app.tool
    async def lookup(value: str) -> dict[str, str]:
        probe.calls["lookup"] += 1
        return {"looked_up": value}

    @app.tool(idempotent=False)
    async def charge(amount: int, idempotency_key: str) -> dict[str, object]:
        probe.calls["charge"] += 1
        return {"charged": amount, "key": idempotency_key}

    async def refund_applied(amount: int, idempotency_key: str) -> dict[str, object] | None:
        probe.calls["refund_check"] += 1
        return probe.refund_found

    @app.tool(idempotent=False, reconcile=refund_applied)
    async def refund(amount: int, idempotency_key: str) -> dict[str, object]:
        probe.calls["refund"] += 1
        return {"refunded": amount}


def _agents(app: App, probe: Probe) -> None:
    @app.agent
    class Refunder(Agent[TicketIn, Done]):
        name = "refunder"
        input_model = TicketIn
        output_model = Done
        tools = ("charge", "refund")

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            paid = await ctx.tool("charge", amount=7)
            back = await ctx.tool("refund", amount=7)
            return Done(value=f"{paid['charged']}-{back['refunded']}")

    @app.agent
    class Gated(Agent[TicketIn, Done]):
        name = "gated"
        input_model = TicketIn
        output_model = Done

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            probe.entered.set()
            await probe.gate.wait()
            probe.cancel_seen = await ctx.cancelled()
            return Done(value=data.ticket.subject)

    @app.agent
    class Flaky(Agent[TicketIn, Done]):
        """Calls both tools, then fails while ``failures_left`` lasts."""

        name = "flaky"
        input_model = TicketIn
        output_model = Done
        tools = ("lookup", "charge")

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            found = await ctx.tool("lookup", value=data.ticket.subject)
            paid = await ctx.tool("charge", amount=5)
            if probe.failures_left > 0:
                probe.failures_left -= 1
                raise RuntimeError("transient failure after the tools ran")
            return Done(value=f"{found['looked_up']}:{paid['charged']}")

    @app.agent
    class Refuses(Agent[TicketIn, Done]):
        name = "refuses"
        input_model = TicketIn
        output_model = Done

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            probe.calls["refuses"] += 1
            raise AgentError("the ticket is spam", non_retryable=True)

    @app.agent
    class Chooser(Agent[TicketIn, Done]):
        """Lets the model decide which tools to call (a real model path)."""

        name = "chooser"
        input_model = TicketIn
        output_model = Done
        tools = ("lookup",)

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            request = ModelRequest("choose", "Look things up, then answer.", data.ticket.body)
            return await ctx.model.parse_with_tools(request, Done, ["lookup"])


def build_promise_app(probe: Probe) -> App:
    """``build_app`` plus the agents and tools of tests/test_promise.py."""
    app = build_app(probe)
    _promise_tools(app, probe)
    _promise_agents(app, probe)
    app.pipeline("wirer", ["wirer"], input_key="ticket")
    app.pipeline("fencer", ["fencer"], input_key="ticket")
    app.pipeline("disconnected", ["disconnected"], input_key="ticket")
    app.validate()
    return app


def _promise_tools(app: App, probe: Probe) -> None:
    @app.tool(idempotent=False)
    async def wire(amount: int, idempotency_key: str) -> dict[str, object]:
        """A non-idempotent transfer; raises what ``probe.wire_errors`` holds next."""
        probe.calls["wire"] += 1
        if probe.wire_errors:
            raise probe.wire_errors.pop(0)
        return {"wired": amount}

    @app.tool
    async def fenced_put(value: str, idempotency_key: str, fencing_token: int) -> dict[str, object]:
        """A write to a remote that refuses superseded callers by their fencing token."""
        probe.calls["fenced_put"] += 1
        probe.tokens.append(fencing_token)
        return {"stored": value, "token": fencing_token}


def _promise_agents(app: App, probe: Probe) -> None:
    @app.agent
    class Wirer(Agent[TicketIn, Done]):
        name = "wirer"
        input_model = TicketIn
        output_model = Done
        tools = ("wire",)

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            sent = await ctx.tool("wire", amount=9)
            return Done(value=f"wired {sent['wired']}")

    @app.agent
    class Fencer(Agent[TicketIn, Done]):
        name = "fencer"
        input_model = TicketIn
        output_model = Done
        tools = ("fenced_put",)

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            put = await ctx.tool("fenced_put", value=data.ticket.subject)
            return Done(value=f"token {put['token']}")

    @app.agent
    class Disconnected(Agent[TicketIn, Done]):
        """Its own remote is unreachable: Python's ConnectionError, a step failure."""

        name = "disconnected"
        input_model = TicketIn
        output_model = Done

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            probe.calls["disconnected"] += 1
            raise ConnectionError("the agent's own API refused the connection")


TICKET = Ticket(tenant_id="t1", customer_id="c1", subject="hello", body="a body")
