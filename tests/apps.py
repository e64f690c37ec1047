"""Small apps for protocol tests: a gated agent, a flaky agent and counting tools."""

from __future__ import annotations

from collections import Counter

import anyio

from agents.base import Agent, AgentInput, AgentOutput
from orchestrator.app import App
from orchestrator.context import StepContext
from schemas import Ticket


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


def build_app(probe: Probe) -> App:
    app = App("protocol-test", version="test")

    @app.tool
    async def lookup(value: str) -> dict[str, str]:
        probe.calls["lookup"] += 1
        return {"looked_up": value}

    @app.tool(idempotent=False)
    async def charge(amount: int, idempotency_key: str) -> dict[str, object]:
        probe.calls["charge"] += 1
        return {"charged": amount, "key": idempotency_key}

    @app.agent
    class Gated(Agent[TicketIn, Done]):
        name = "gated"
        input_model = TicketIn
        output_model = Done

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            probe.entered.set()
            await probe.gate.wait()
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

    app.pipeline("gated", ["gated"])
    app.pipeline("flaky", ["flaky"])
    app.validate()
    return app


TICKET = Ticket(tenant_id="t1", customer_id="c1", subject="hello", body="a body")
