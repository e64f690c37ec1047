"""ResponseAgent: drafts the reply from what research found, citing it."""

from __future__ import annotations

from agents.base import Agent
from agents.models import DraftReply, ResponseInput, ResponseResult
from orchestrator.context import StepContext
from orchestrator.llm import ModelRequest

INSTRUCTIONS = """You write the reply to a customer-support ticket. Use only the facts in
the research (orders, help-center articles, similar past tickets); cite each one you use by
its id in `citations`. Match the customer's tone: apologise to upset customers, be brief.
If the request is too vague to act on, ask for the missing details."""


class ResponseAgent(Agent[ResponseInput, ResponseResult]):
    name = "response"
    input_model = ResponseInput
    output_model = ResponseResult

    async def run(self, ctx: StepContext, data: ResponseInput) -> ResponseResult:
        research = data.research.model_dump_json(indent=1) if data.research else "none"
        draft = await ctx.model.parse(
            ModelRequest(
                purpose="reply",
                instructions=INSTRUCTIONS,
                content=(
                    f"Ticket: {data.ticket.model_dump_json()}\n"
                    f"Triage: {data.triage.model_dump_json()}\nResearch: {research}"
                ),
                context={"ticket": data.ticket, "triage": data.triage, "research": data.research},
            ),
            DraftReply,
        )
        ctx.say(draft.reply)
        return ResponseResult(**draft.model_dump(), model=ctx.model.name)
