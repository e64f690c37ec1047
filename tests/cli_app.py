"""A small app for the command-line tests: one agent that completes, fails, or asks.

orchestrator --app tests.cli_app:app submit "fail now" --wait   -> exit 3
orchestrator --app tests.cli_app:app submit "ask me" --wait     -> exit 4
"""

from __future__ import annotations

from pydantic import BaseModel

from orchestrator import Agent, AgentInput, AgentOutput, App, StepContext
from orchestrator.errors import AgentError


class Note(BaseModel):
    text: str


class EchoIn(AgentInput):
    note: Note


class Echo(AgentOutput):
    text: str
    answer: str = ""


app = App("cli-test", version="test")


@app.agent
class EchoAgent(Agent[EchoIn, Echo]):
    """Echoes the note; "fail" in it fails for good; "ask" in it asks a question."""

    name = "echo"
    input_model = EchoIn
    output_model = Echo

    async def run(self, ctx: StepContext, data: EchoIn) -> Echo:
        text = data.note.text
        if "fail" in text:
            raise AgentError("asked to fail", non_retryable=True)
        answer = ctx.ask("What is the order number?") if "ask" in text else ""
        return Echo(text=text, answer=answer)


app.pipeline(
    "notes",
    ["echo"],
    input_model=Note,
    input_key="note",
    from_text=lambda text: Note(text=text),
    default=True,
)
app.validate()
