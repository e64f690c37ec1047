"""The app ``benchmarks/takeover.py`` runs in its worker subprocesses: one long, idle step.

The ``sleeper`` agent sleeps for the number of seconds in the ticket's body, then
ends the workflow. No tools and no model: the step is only long, never busy.

    orchestrator --app benchmarks.takeover_app:app worker
"""

from __future__ import annotations

from typing import Any

import anyio

from orchestrator.app import App
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext

app = App("takeover-bench", version="1")


class Input(AgentInput):
    ticket: dict[str, Any]


class Slept(AgentOutput):
    seconds: float


@app.agent
class Sleeper(Agent[Input, Slept]):
    name = "sleeper"
    input_model = Input
    output_model = Slept
    timeout_seconds = 600.0

    async def run(self, ctx: StepContext, data: Input) -> Slept:
        seconds = float(data.ticket["body"])
        await anyio.sleep(seconds)
        return Slept(seconds=seconds)


app.pipeline("sleep", ["sleeper"], input_key="ticket", default=True)
app.validate()
