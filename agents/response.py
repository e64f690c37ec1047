"""ResponseAgent: joins the research branches and drafts the reply, citing what they found.

When the ticket is about an order that research could not identify, it asks
the customer for the order number and waits (durably, without holding a
worker) for the answer; after ``reminder_after`` without one it sends a
reminder, and after as long again it closes the ticket.
"""

from __future__ import annotations

import os
from datetime import timedelta

from orchestrator.agents.models import DraftReply, ResearchFindings, ResponseInput, ResponseResult
from orchestrator.agents.offline import ORDER_ID
from orchestrator.agents.research import ORDER_CATEGORIES
from orchestrator.errors import WaitTimedOut
from orchestrator.models.llm import ModelRequest
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext

INSTRUCTIONS = """You write the reply to a customer-support ticket. Use only the facts in
the research (orders, help-center articles, similar past tickets) and what is remembered of
the customer (their earlier issues and preferences: honour them); cite each one you use by
its id in `citations` (memory:<id> for a remembered one). Match the customer's tone:
apologise to upset customers, be brief. If the request is too vague to act on, ask for the
missing details."""
ASK_ORDER = "Could you tell me the order number this is about? It looks like ORD-12345."


REMINDER = "Just checking in: which order is this about? Reply with its number (ORD-12345)."
CLOSING = (
    "We have not heard back, so we are closing this ticket for now. Reply any time with "
    "your order number and we will pick it up again."
)


def _reminder_after() -> timedelta:
    # Configurable per deployment; a day by default.
    return timedelta(seconds=float(os.environ.get("SUPPORT_REMINDER_SECONDS", "86400")))


def _remembered_text(data: ResponseInput) -> str:
    return "; ".join(f"[memory:{m.id}] ({m.kind}) {m.content}" for m in data.remembered) or "none"


class ResponseAgent(Agent[ResponseInput, ResponseResult]):
    """Joins the research branches and drafts the reply; asks for a missing order number
    first, and closes the ticket if none comes (see the module doc)."""

    name = "response"
    input_model = ResponseInput
    output_model = ResponseResult
    tools = ("lookup_order",)
    join = True  # runs once, after the research branches (order lookup, knowledge search)

    async def run(self, ctx: StepContext, data: ResponseInput) -> ResponseResult:
        """Draft the reply with the model and say it in the transcript; the closing message
        instead when the customer never named the order."""
        try:
            research = await self._with_customer_order(ctx, data)
        except WaitTimedOut:
            ctx.say(CLOSING)
            return ResponseResult(reply=CLOSING, citations=[], model=ctx.model.name)
        draft = await ctx.model.parse(
            ModelRequest(
                purpose="reply",
                instructions=INSTRUCTIONS,
                content=(
                    f"Ticket: {data.ticket.model_dump_json()}\n"
                    f"Triage: {data.triage.model_dump_json()}\n"
                    f"Research: {research.model_dump_json(indent=1) if research else 'none'}\n"
                    f"Remembered of this customer: {_remembered_text(data)}"
                ),
                context={
                    "ticket": data.ticket,
                    "triage": data.triage,
                    "research": research,
                    "remembered": data.remembered,
                },
            ),
            DraftReply,
        )
        ctx.say(draft.reply)
        return ResponseResult(**draft.model_dump(), model=ctx.model.name)

    async def _with_customer_order(
        self, ctx: StepContext, data: ResponseInput
    ) -> ResearchFindings | None:
        """An order ticket with no order found: ask for the number (the workflow waits)."""
        research = data.research
        if (
            research is None
            or research.orders
            or research.missing_orders
            or data.triage.category not in ORDER_CATEGORIES
        ):
            return research
        try:
            answer = ctx.ask(ASK_ORDER, timeout=_reminder_after())
        except WaitTimedOut:
            answer = ctx.ask(REMINDER, timeout=_reminder_after())  # a second timeout closes
        named = ORDER_ID.findall(answer)
        if not named:
            return research.model_copy(update={"missing_orders": [answer.strip()[:40]]})
        order = await ctx.tool(
            "lookup_order", order_id=named[0].upper(), customer_id=data.ticket.customer_id
        )
        if order is None:
            return research.model_copy(update={"missing_orders": [named[0].upper()]})
        return research.model_copy(update={"orders": [order]})
