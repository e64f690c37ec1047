"""An app whose agents call a scripted model with known usage, for cost and ``show`` tests.

At ``PRICES`` a ``plan`` call (1,000 prompt and 500 completion tokens) costs $0.006 and a
``write`` call (2,000 and 1,000) $0.012.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

from orchestrator.app import App
from orchestrator.models.llm import ModelRequest, Usage
from orchestrator.runtime import Runtime
from orchestrator.settings import ModelPrice, Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.testing import Reply, ScriptedModel
from tests.conftest import runtime_for

MODEL = "scripted-model"
PRICES = {MODEL: ModelPrice(input=Decimal(2), output=Decimal(8))}  # USD per million tokens
PLAN_USAGE, WRITE_USAGE = Usage(1000, 500), Usage(2000, 1000)
PLAN_USD, WRITE_USD = Decimal("0.006"), Decimal("0.012")


class Anything(AgentInput):
    pass


class Note(AgentOutput):
    text: str


class Probe:
    """What the agents report into and are steered by, per test."""

    def __init__(self) -> None:
        self.failures_left = 0  # the planner fails (after its model call and tool) this often
        self.lookups = 0


def scripted_model() -> ScriptedModel:
    """Answers every ``plan`` and ``write`` request, with their usage."""
    return ScriptedModel(
        {
            "plan": Reply({"text": "look it up"}, usage=PLAN_USAGE),
            "write": Reply({"text": "Dear customer, it is refunded."}, usage=WRITE_USAGE),
        }
    )


def _ask(purpose: str) -> ModelRequest:
    return ModelRequest(purpose, f"Do the {purpose}.", "a ticket")


def build_cost_app(probe: Probe) -> App:
    app = App("cost-test", version="test")

    @app.tool
    async def lookup(order: str) -> dict[str, str]:
        probe.lookups += 1
        return {"order": order, "status": "shipped"}

    @app.agent
    class Planner(Agent[Anything, Note]):
        """A model call, a memory recall and a tool call; then fails while told to."""

        name = "planner"
        input_model = Anything
        output_model = Note

        async def run(self, ctx: StepContext, data: Anything) -> Note:
            plan = await ctx.model.parse(_ask("plan"), Note)
            await ctx.memory.recall("refund policy")
            found = await ctx.tool("lookup", order="ORD-1")
            if probe.failures_left > 0:
                probe.failures_left -= 1
                raise RuntimeError("planner hiccup")
            return Note(text=f"{plan.text}: {found['status']}")

    @app.agent
    class Writer(Agent[Anything, Note]):
        name = "writer"
        input_model = Anything
        output_model = Note

        async def run(self, ctx: StepContext, data: Anything) -> Note:
            return await ctx.model.parse(_ask("write"), Note)

    @app.agent
    class Approver(Agent[Anything, Note]):
        """Waits for the signal ``approval``."""

        name = "approver"
        input_model = Anything
        output_model = Note

        async def run(self, ctx: StepContext, data: Anything) -> Note:
            payload: dict[str, Any] = await ctx.wait_for("approval")
            return Note(text=f"approved by {payload['by']}")

    @app.agent
    class Spender(Agent[Anything, Note]):
        """Two ``write`` calls in one step ($0.024)."""

        name = "spender"
        input_model = Anything
        output_model = Note

        async def run(self, ctx: StepContext, data: Anything) -> Note:
            await ctx.model.parse(_ask("write"), Note)
            return await ctx.model.parse(_ask("write"), Note)

    @app.agent
    class Free(Agent[Anything, Note]):
        """No model call at all."""

        name = "free"
        input_model = Anything
        output_model = Note

        async def run(self, ctx: StepContext, data: Anything) -> Note:
            return Note(text="free")

    app.pipeline("plan_write", ["planner", "writer"])
    app.pipeline("story", ["planner", "approver", "writer"])
    app.pipeline("write", ["writer"])
    app.pipeline("spend", ["spender"])
    app.pipeline("free", ["free"])
    app.validate()
    return app


@contextlib.asynccontextmanager
async def priced_runtime(
    settings: Settings, app: App, model: ScriptedModel
) -> AsyncIterator[Runtime]:
    """A runtime on the test's servers with ``model`` and its prices."""
    priced = settings.model_copy(update={"model_prices": PRICES})
    async with runtime_for(priced, app) as runtime:
        yield dataclasses.replace(runtime, model=model)
