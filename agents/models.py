"""Input and output models of the built-in support agents."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.agents.ticket import Ticket
from orchestrator.step.agent import AgentInput, AgentOutput

Category = Literal["billing", "shipping", "technical", "account", "returns", "general"]
Priority = Literal["low", "normal", "high", "urgent"]
Sentiment = Literal["positive", "neutral", "negative", "angry"]


class TriageInput(AgentInput):
    """The triage agent's input: the ticket."""

    ticket: Ticket


class TriageDecision(AgentOutput):
    """What the model is asked for."""

    category: Category
    priority: Priority
    sentiment: Sentiment
    needs_research: bool
    order_ids: list[str]
    summary: str


class TriageResult(TriageDecision):
    """The triage decision and the model that made it."""

    model: str  # which model decided (the offline one says so)


class Article(AgentOutput):
    """A help-center article found for the ticket, with its keyword score."""

    id: str
    title: str
    snippet: str
    score: float


class SimilarTicket(AgentOutput):
    """A similar resolved ticket of the tenant, with its similarity score."""

    id: str
    subject: str
    resolution: str
    score: float


class ResearchInput(AgentInput):
    """The ticket and its triage (the built-in agents take ``LookupInput``, alike)."""

    ticket: Ticket
    triage: TriageResult


class Remembered(AgentOutput):
    """A long-term memory of the customer that research recalled (cited as
    ``memory:<id>``): a past issue's summary, a preference, what worked."""

    id: int
    kind: str
    content: str
    score: float


class ResearchPlan(AgentOutput):
    """What research fans out to (the lookups run as parallel branches), and what it
    recalled of the customer."""

    lookups: list[Literal["order_lookup", "knowledge_search"]]
    remembered: list[Remembered] = Field(default_factory=list)
    earlier_messages: int = 0  # the customer's messages before this ticket (transcript)


class LookupInput(AgentInput):
    """Input of the research agent and both lookups: the ticket and its triage."""

    ticket: Ticket
    triage: TriageResult


class OrderFindings(AgentOutput):
    """The orders found, and the named order ids not found on the customer's account."""

    orders: list[dict[str, Any]]
    missing_orders: list[str]


class KnowledgeFindings(AgentOutput):
    """Help-center articles and similar past tickets found for the ticket."""

    articles: list[Article]
    similar_tickets: list[SimilarTicket]


class ResearchFindings(AgentOutput):
    """Everything the lookups found, as the reply is drafted from it."""

    orders: list[dict[str, Any]]
    missing_orders: list[str]
    articles: list[Article]
    similar_tickets: list[SimilarTicket]


class ResponseInput(AgentInput):
    """The join's input: each branch's output under its agent name (absent if skipped)."""

    ticket: Ticket
    triage: TriageResult
    order_lookup: OrderFindings | None = None
    knowledge_search: KnowledgeFindings | None = None
    remembered: list[Remembered] = Field(
        default_factory=list
    )  # what research recalled of the customer

    @property
    def research(self) -> ResearchFindings | None:
        """Both branches' findings in one (empty for a skipped branch); None when research
        did not run at all."""
        if self.order_lookup is None and self.knowledge_search is None:
            return None
        orders = self.order_lookup or OrderFindings(orders=[], missing_orders=[])
        knowledge = self.knowledge_search or KnowledgeFindings(articles=[], similar_tickets=[])
        return ResearchFindings(**orders.model_dump(), **knowledge.model_dump())


class DraftReply(AgentOutput):
    """What the model is asked for."""

    reply: str
    citations: list[str]


class ResponseResult(DraftReply):
    """The reply sent to the customer, what it cites, and the model that wrote it."""

    model: str
