"""A custom agent and a new tool on the built-in support pipeline, without touching the runtime.

Angry or urgent tickets are routed by triage to an EscalationAgent, which pages
the on-call lead through a new tool and then hands the ticket on to research.

    orchestrator --app examples.custom_agent:app worker
    orchestrator --app examples.custom_agent:app submit "THIS IS UNACCEPTABLE!!!" --wait
"""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator import Agent, AgentInput, AgentOutput, App, StepContext
from orchestrator.agents import support
from orchestrator.agents.models import TriageResult
from orchestrator.agents.ticket import Ticket
from orchestrator.agents.triage import TriageAgent

app = App("support-with-escalation", version="0.1.0")


@app.tool
async def page_on_call(team: str, summary: str, idempotency_key: str) -> dict[str, str]:
    """Page the on-call lead. The key makes a retried page a no-op at the pager."""
    return {"paged": team, "page_id": f"page-{idempotency_key[-12:]}", "summary": summary}


class EscalationInput(AgentInput):
    ticket: Ticket
    triage: TriageResult


class Escalation(AgentOutput):
    team: str
    page_id: str


@app.agent
class EscalationAgent(Agent[EscalationInput, Escalation]):
    name = "escalation"
    input_model = EscalationInput
    output_model = Escalation
    tools = ("page_on_call",)
    routes = ("research",)

    async def run(self, ctx: StepContext, data: EscalationInput) -> Escalation:
        team = "billing-leads" if data.triage.category == "billing" else "support-leads"
        page = await ctx.tool("page_on_call", team=team, summary=data.triage.summary)
        return Escalation(team=team, page_id=page["page_id"])

    def route(self, output: Escalation) -> Sequence[str]:
        return ["research"]


class EscalatingTriage(TriageAgent):
    routes = ("escalation", "response")

    def route(self, output: TriageResult) -> Sequence[str] | None:
        if output.sentiment == "angry" or output.priority == "urgent":
            return ["escalation"]
        return super().route(output)


app.include(support.app)  # everything of the built-in support app…
app.agent(EscalatingTriage, replace=True)  # …with this triage in place of its own
app.validate()
