"""TriageAgent: category, priority, sentiment, and whether research is needed."""

from __future__ import annotations

from collections.abc import Sequence

from orchestrator.agents.models import TriageDecision, TriageInput, TriageResult
from orchestrator.models.llm import ModelRequest
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext

INSTRUCTIONS = """You triage customer-support tickets. Classify the category (billing,
shipping, technical, account, returns, general), the priority (low, normal, high, urgent),
the customer's sentiment (positive, neutral, negative, angry), list every order id
mentioned (like ORD-10007), say whether looking up orders or help articles would help
(needs_research), and summarise the request in one sentence."""


class TriageAgent(Agent[TriageInput, TriageResult]):
    """Classifies the ticket with the model and decides whether research is needed."""

    name = "triage"
    input_model = TriageInput
    output_model = TriageResult

    async def run(self, ctx: StepContext, data: TriageInput) -> TriageResult:
        """The model's triage decision, labelled with the model's name."""
        ticket = data.ticket
        decision = await ctx.model.parse(
            ModelRequest(
                purpose="triage",
                instructions=INSTRUCTIONS,
                content=f"Subject: {ticket.subject}\n\n{ticket.body}",
                context={"ticket": ticket},
            ),
            TriageDecision,
        )
        return TriageResult(**decision.model_dump(), model=ctx.model.name)

    def route(self, output: TriageResult) -> Sequence[str] | None:
        """The pipeline (research) when research is needed, else straight to the response."""
        # Nothing to look up: go straight to the reply (which asks for details).
        return None if output.needs_research else ["response"]
