"""ResearchAgent: looks up orders, the help center and similar past tickets via tools."""

from __future__ import annotations

from typing import Any

from orchestrator.agents.models import Article, ResearchFindings, ResearchInput, SimilarTicket
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext

ORDER_CATEGORIES = frozenset({"billing", "shipping", "returns"})


class ResearchAgent(Agent[ResearchInput, ResearchFindings]):
    name = "research"
    input_model = ResearchInput
    output_model = ResearchFindings
    tools = ("lookup_order", "orders_for_customer", "search_help_center", "search_past_tickets")

    async def run(self, ctx: StepContext, data: ResearchInput) -> ResearchFindings:
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
        query = f"{ticket.subject} {ticket.body}"
        articles = await ctx.tool("search_help_center", query=query, category=triage.category)
        similar = await ctx.tool("search_past_tickets", query=query)
        return ResearchFindings(
            orders=orders,
            missing_orders=missing,
            articles=[Article(**a) for a in articles],
            similar_tickets=[SimilarTicket(**s) for s in similar],
        )
