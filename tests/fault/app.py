"""The app fault tests run in worker subprocesses: three steps, each with a counted effect.

Tools call the counting tool server named by ``FAULT_TOOLSERVER_URL``, which
records every effect per idempotency key in its own process.
"""

from __future__ import annotations

import os

import anyio

from agents.base import Agent, AgentInput, AgentOutput
from orchestrator.app import App
from orchestrator.context import StepContext
from tests.fault.toolserver import applied_count, post_effect

app = App("fault", version="fault-1")


def _server() -> str:
    return os.environ["FAULT_TOOLSERVER_URL"]


@app.tool
async def effect(label: str, idempotency_key: str) -> dict[str, object]:
    """Idempotent: the server applies one effect per key, however often it is called."""
    return await post_effect(_server(), idempotency_key, "idempotent", {"label": label})


async def payment_applied(label: str, idempotency_key: str) -> dict[str, object] | None:
    return {"settled": True} if await applied_count(_server(), idempotency_key) else None


@app.tool(idempotent=False)
async def payment(label: str, idempotency_key: str) -> dict[str, object]:
    """Not idempotent: every call the server receives applies an effect."""
    return await post_effect(_server(), idempotency_key, "plain", {"label": label})


@app.tool(idempotent=False, reconcile=payment_applied)
async def checked_payment(label: str, idempotency_key: str) -> dict[str, object]:
    """Not idempotent, but an in-doubt call can be checked against the server."""
    return await post_effect(_server(), idempotency_key, "plain", {"label": label})


class Ticket(AgentInput):
    ticket: dict[str, object]


class Step(AgentOutput):
    effect_id: object


def _agent(name: str, tool: str) -> type[Agent[Ticket, Step]]:
    class Worker(Agent[Ticket, Step]):
        input_model = Ticket
        output_model = Step
        tools = (tool,)

        async def run(self, ctx: StepContext, data: Ticket) -> Step:
            # Some work time, so a disturbance lands while many steps are in flight.
            await anyio.sleep(float(os.environ.get("FAULT_STEP_SECONDS", "0")))
            result = await ctx.tool(tool, label=name)
            return Step(effect_id=result.get("effect_id", result.get("settled")))

    return type(f"Fault_{name}", (Worker,), {"name": name})


class Slow(Agent[Ticket, Step]):
    """Sleeps ``FAULT_SLOW_SECONDS`` before its effect: long enough to be paused mid-step."""

    name = "slow"
    input_model = Ticket
    output_model = Step
    tools = ("effect",)

    async def run(self, ctx: StepContext, data: Ticket) -> Step:
        await anyio.sleep(float(os.environ.get("FAULT_SLOW_SECONDS", "0")))
        result = await ctx.tool("effect", label="slow")
        return Step(effect_id=result["effect_id"])


class AlwaysRaises(Agent[Ticket, Step]):
    name = "always_raises"
    input_model = Ticket
    output_model = Step

    async def run(self, ctx: StepContext, data: Ticket) -> Step:
        raise RuntimeError("this agent always fails")


app.agent(_agent("first", "effect"))
app.agent(_agent("second", "effect"))
app.agent(_agent("third", "effect"))
app.agent(_agent("pay", "payment"))
app.agent(_agent("checked_pay", "checked_payment"))
app.agent(AlwaysRaises)
app.agent(Slow)
app.pipeline("three", ["first", "second", "third"], default=True)
app.pipeline("pay", ["first", "pay"])
app.pipeline("pay_only", ["pay"])
app.pipeline("checked_pay", ["first", "checked_pay"])
app.pipeline("poison", ["always_raises"])
app.pipeline("slow", ["slow"])
app.validate()
