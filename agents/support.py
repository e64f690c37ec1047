"""The built-in customer-support app (the CLI's default).

triage → research → (order_lookup ∥ knowledge_search) → response: research fans out
to two parallel lookups, and the response agent joins them.
"""

from __future__ import annotations

from orchestrator.agents import offline, tools
from orchestrator.agents.research import KnowledgeSearchAgent, OrderLookupAgent, ResearchAgent
from orchestrator.agents.response import ResponseAgent
from orchestrator.agents.ticket import Ticket
from orchestrator.agents.triage import TriageAgent
from orchestrator.app import App
from orchestrator.runtime import Runtime
from orchestrator.store import memory

# The bundled past tickets are seeded into the memory of these tenants (the
# sample tickets' tenants and the default one); memory is always per tenant.
SAMPLE_TENANTS = ("default", "acme", "globex")

app = App("support", version="0.1.0")
app.agent(TriageAgent)
app.agent(ResearchAgent)
app.agent(OrderLookupAgent)
app.agent(KnowledgeSearchAgent)
app.agent(ResponseAgent)
app.tool(tools.lookup_order)
app.tool(tools.orders_for_customer)
app.tool(tools.search_help_center)
app.tool(tools.search_past_tickets)
app.pipeline(
    "support",
    ["triage", "research", "response"],
    input_model=Ticket,
    input_key="ticket",
    from_text=Ticket.from_text,
    default=True,
    consolidate=True,  # a resolved ticket becomes the customer's long-term memory
)
app.offline_rule("triage")(offline.triage)
app.offline_rule("reply")(offline.reply)


def sample_tickets() -> list[Ticket]:
    """The bundled sample tickets (what ``orchestrator demo`` runs)."""
    return [Ticket.model_validate(item) for item in tools.load("tickets.json")]


@app.on_setup
async def seed_past_tickets(runtime: Runtime) -> None:
    """Put the bundled past tickets into each sample tenant's memory (a setup hook, run
    after migrations); ones already there are left as they are."""
    async with runtime.pool.acquire() as conn:
        for tenant in SAMPLE_TENANTS:
            for past in tools.load("past_tickets.json"):
                text = f"{past['subject']}\n{past['body']}"
                await memory.remember(
                    conn,
                    tenant_id=tenant,
                    kind="past_ticket",
                    key=past["id"],
                    content=text,
                    metadata={
                        "subject": past["subject"],
                        "resolution": past["resolution"],
                        "category": past["category"],
                    },
                    embedder=runtime.embedder.name,
                    embedding=await runtime.embedder.embed(text),
                )
