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


class ResearchFindings(AgentOutput):
    orders: list[dict[str, Any]]
    missing_orders: list[str]
    articles: list[Article]
    similar_tickets: list[SimilarTicket]


class ResponseInput(AgentInput):
    ticket: Ticket
    triage: TriageResult
    research: ResearchFindings | None = None


class DraftReply(AgentOutput):
    """What the model is asked for."""

    reply: str
    citations: list[str]


class ResponseResult(DraftReply):
    model: str
