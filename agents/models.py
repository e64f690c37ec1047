"""Input and output models of the built-in support agents."""

from __future__ import annotations

from typing import Any, Literal

from orchestrator.agents.ticket import Ticket
from orchestrator.step.agent import AgentInput, AgentOutput

Category = Literal["billing", "shipping", "technical", "account", "returns", "general"]
Priority = Literal["low", "normal", "high", "urgent"]
Sentiment = Literal["positive", "neutral", "negative", "angry"]


class TriageInput(AgentInput):
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
    model: str  # which model decided (the offline one says so)


class Article(AgentOutput):
    id: str
    title: str
    snippet: str
    score: float


class SimilarTicket(AgentOutput):
    id: str
    subject: str
    resolution: str
    score: float


class ResearchInput(AgentInput):
    ticket: Ticket
    triage: TriageResult


class ResearchPlan(AgentOutput):
    """What research fans out to: the lookups run as parallel branches."""

    lookups: list[Literal["order_lookup", "knowledge_search"]]


class LookupInput(AgentInput):
    ticket: Ticket
    triage: TriageResult


class OrderFindings(AgentOutput):
    orders: list[dict[str, Any]]
    missing_orders: list[str]


class KnowledgeFindings(AgentOutput):
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

    @property
    def research(self) -> ResearchFindings | None:
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
    model: str
