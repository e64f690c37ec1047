"""Research fans out: order lookup and knowledge search run as parallel branches.

Each branch is its own step (its own retries, its own tool ledger); the response
agent joins them and drafts the reply from both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.agents.models import (
    Article,
    KnowledgeFindings,
    LookupInput,
    OrderFindings,
    Remembered,
    ResearchPlan,
    SimilarTicket,
)
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext

ORDER_CATEGORIES = frozenset({"billing", "shipping", "returns"})
# What research recalls of the customer: past issues (summaries, what resolved them)
# and what they told us (preferences, constraints, facts).
REMEMBERED_KINDS = ("summary", "outcome", "preference", "constraint", "fact")


class ResearchAgent(Agent[LookupInput, ResearchPlan]):
    """Decides what to look up; ``route`` starts the lookups in parallel."""

    name = "research"
    input_model = LookupInput
    output_model = ResearchPlan
    routes = ("order_lookup", "knowledge_search")

    async def run(self, ctx: StepContext, data: LookupInput) -> ResearchPlan:
        """The knowledge search always; the order lookup too for a ticket about orders.
        Recalls what the customer's earlier tickets taught (long-term memory) and counts
        their earlier messages (the transcript), so the reply can pick up from there."""
        about_orders = bool(data.triage.order_ids) or data.triage.category in ORDER_CATEGORIES
        lookups: list[Any] = ["order_lookup"] if about_orders else []
        ticket = data.ticket
        recalled = await ctx.memory.recall(
            f"{ticket.subject} {ticket.body}", k=5, kinds=REMEMBERED_KINDS
        )
        # The customer's transcript across sessions ends with this ticket's own message
        # (triage and research say nothing): the lines before it are earlier contact.
        earlier = (await ctx.memory.transcript(limit=50))[:-1]
        return ResearchPlan(
            lookups=[*lookups, "knowledge_search"],
            remembered=[
                Remembered(id=m.id, kind=m.kind, content=m.content, score=round(m.score, 4))
                for m in recalled
            ],
            earlier_messages=len(earlier),
        )

    def state_update(self, output: ResearchPlan) -> dict[str, Any]:
        """The plan, and what was recalled under ``remembered`` (the response reads it)."""
        return {
            self.name: output.model_dump(mode="json"),
            "remembered": [m.model_dump(mode="json") for m in output.remembered],
        }

    def route(self, output: ResearchPlan) -> Sequence[str]:
        """The planned lookups, as parallel branches."""
        return output.lookups


class OrderLookupAgent(Agent[LookupInput, OrderFindings]):
    """The orders the ticket names, or the customer's one open order."""

    name = "order_lookup"
    input_model = LookupInput
    output_model = OrderFindings
    tools = ("lookup_order", "orders_for_customer")
    routes = ("response",)

    async def run(self, ctx: StepContext, data: LookupInput) -> OrderFindings:
        """Look up each order id triage found; with none named on an order ticket, take the
        customer's open order if there is exactly one."""
        ticket, triage = data.ticket, data.triage
        orders: list[dict[str, Any]] = []
        missing: list[str] = []
        for order_id in triage.order_ids:
            order = await ctx.tool(
                "lookup_order", order_id=order_id, customer_id=ticket.customer_id
            )
            if order is None:
                missing.append(order_id)
            else:
                orders.append(order)
        if not triage.order_ids and triage.category in ORDER_CATEGORIES:
            # No order named: if the customer has exactly one open order, that is the one.
            candidates = await ctx.tool("orders_for_customer", customer_id=ticket.customer_id)
            open_orders = [
                o for o in candidates if o["status"] in {"processing", "shipped", "delayed"}
            ]
            if len(open_orders) == 1:
                orders.append(open_orders[0])
        return OrderFindings(orders=orders, missing_orders=missing)

    def route(self, output: OrderFindings) -> Sequence[str]:
        """On to the response agent, which joins the branches."""
        return ["response"]


class KnowledgeSearchAgent(Agent[LookupInput, KnowledgeFindings]):
    """Help-center articles and similar past tickets of this tenant."""

    name = "knowledge_search"
    input_model = LookupInput
    output_model = KnowledgeFindings
    tools = ("search_help_center", "search_past_tickets")
    routes = ("response",)

    async def run(self, ctx: StepContext, data: LookupInput) -> KnowledgeFindings:
        """Search the help center (favouring the triaged category) and the tenant's past
        tickets for the ticket's subject and body."""
        ticket, triage = data.ticket, data.triage
        query = f"{ticket.subject} {ticket.body}"
        articles = await ctx.tool("search_help_center", query=query, category=triage.category)
        similar = await ctx.tool("search_past_tickets", query=query)
        return KnowledgeFindings(
            articles=[Article(**a) for a in articles],
            similar_tickets=[SimilarTicket(**s) for s in similar],
        )

    def route(self, output: KnowledgeFindings) -> Sequence[str]:
        """On to the response agent, which joins the branches."""
        return ["response"]
