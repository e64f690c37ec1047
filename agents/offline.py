"""Rules of the offline deterministic model: keywords for triage, templates for replies.

No network, no randomness: the same ticket always gets the same decision and
reply. Everything it produces is labelled with the offline model's name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.agents.models import Remembered, ResearchFindings, TriageResult
from orchestrator.agents.ticket import Ticket
from orchestrator.models.llm import ModelRequest

ORDER_ID = re.compile(r"\bORD-\d{3,}\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9']+")
CATEGORY_WORDS: dict[str, tuple[str, ...]] = {
    "billing": (
        "charge",
        "charged",
        "refund",
        "invoice",
        "payment",
        "billing",
        "card",
        "subscription",
        "money",
        "twice",
        "receipt",
    ),
    "shipping": (
        "ship",
        "shipping",
        "shipped",
        "delivery",
        "delivered",
        "arrive",
        "arrived",
        "tracking",
        "package",
        "delayed",
        "carrier",
        "late",
    ),
    "returns": ("return", "damaged", "broken", "cracked", "replacement", "exchange", "warranty"),
    "technical": (
        "crash",
        "crashes",
        "error",
        "bug",
        "api",
        "429",
        "app",
        "login",
        "endpoint",
        "timeout",
        "fails",
        "failing",
    ),
    "account": (
        "password",
        "2fa",
        "authenticator",
        "locked",
        "account",
        "email",
        "sign",
        "recovery",
    ),
}
ANGRY = (
    "unacceptable",
    "ridiculous",
    "worst",
    "chargeback",
    "lawyer",
    "furious",
    "never again",
    "scam",
    "cancel everything",
)
NEGATIVE = (
    "not happy",
    "disappointed",
    "frustrat",
    "still",
    "never arrived",
    "nothing",
    "doesn't work",
    "can't",
    "cannot",
    "problem",
)
POSITIVE = ("thanks", "thank you", "great", "love", "appreciate")
URGENT = ("urgent", "asap", "immediately", "locked out", "can't log in", "chargeback")


def triage(request: ModelRequest) -> Mapping[str, Any]:
    """Triage ``request.context["ticket"]``: category by keyword counts, sentiment and
    priority by phrases, and the order ids the text names."""
    ticket: Ticket = request.context["ticket"]
    text = f"{ticket.subject}\n{ticket.body}"
    lower = text.lower()
    words = _WORD.findall(lower)
    scores = {
        c: sum(words.count(k) if " " not in k else lower.count(k) for k in kws)
        for c, kws in CATEGORY_WORDS.items()
    }
    best = max(scores, key=lambda c: (scores[c], c))
    category = best if scores[best] > 0 else "general"
    sentiment = _sentiment(text, lower)
    order_ids = sorted({m.upper() for m in ORDER_ID.findall(text)})
    priority = (
        "urgent"
        if sentiment == "angry" or any(u in lower for u in URGENT)
        else "high"
        if category in {"billing", "account"} or sentiment == "negative"
        else "low"
        if sentiment == "positive" or category == "general"
        else "normal"
    )
    return {
        "category": category,
        "priority": priority,
        "sentiment": sentiment,
        "needs_research": category != "general" or bool(order_ids) or len(words) > 12,
        "order_ids": order_ids,
        "summary": _first_sentence(ticket.body, 160),
    }


def _sentiment(text: str, lower: str) -> str:
    letters = [c for c in text if c.isalpha()]
    shouting = letters and sum(c.isupper() for c in letters) / len(letters) > 0.6
    if shouting or text.count("!") >= 3 or any(a in lower for a in ANGRY):
        return "angry"
    if any(n in lower for n in NEGATIVE):
        return "negative"
    if any(p in lower for p in POSITIVE):
        return "positive"
    return "neutral"


def reply(request: ModelRequest) -> Mapping[str, Any]:
    """A templated reply from the ticket, triage and research in ``request.context``,
    citing each order, article and past ticket it uses."""
    ticket: Ticket = request.context["ticket"]
    tri: TriageResult = request.context["triage"]
    research: ResearchFindings | None = request.context.get("research")
    name = ticket.customer_id
    lines: list[str] = []
    citations: list[str] = []
    if tri.sentiment == "angry":
        lines.append(
            "I'm truly sorry about this experience; I've made your ticket our top priority."
        )
    elif tri.sentiment == "negative":
        lines.append("I'm sorry for the trouble, and thank you for your patience.")
    found = research is not None and (
        research.orders or research.articles or research.missing_orders
    )
    if research is not None and not found:
        lines.append(
            "Thank you for your question. I've passed it to the team that owns this area, "
            "and they will reply within one business day."
        )
    elif research is None:
        lines.append(
            "To help you quickly, could you tell me what you were trying to do, what "
            "happened instead, and your order number if this is about an order?"
        )
    else:
        for order in research.orders:
            lines.append(_order_line(order))
            citations.append(order["order_id"])
        for missing in research.missing_orders:
            lines.append(
                f"I couldn't find order {missing} on your account; could you double-"
                "check the number?"
            )
        if research.articles:
            top = research.articles[0]
            lines.append(f"From our help center ({top.title}): {_first_sentence(top.snippet)}")
            citations.append(top.id)
        if research.similar_tickets and research.similar_tickets[0].score > 0.2:
            past = research.similar_tickets[0]
            lines.append(f"We resolved a similar case before: {past.resolution}")
            citations.append(past.id)
    lines[:0], cited = _remembered_lines(request.context.get("remembered") or [])
    citations[:0] = cited
    if tri.priority == "urgent":
        lines.append("A senior agent has been notified and will follow up today.")
    body = "\n\n".join(lines)
    return {"reply": f"Hi {name},\n\n{body}\n\nBest regards,\nSupport team", "citations": citations}


def _remembered_lines(remembered: Sequence[Remembered]) -> tuple[list[str], list[str]]:
    """A returning customer is greeted with what we remember (each memory cited as
    ``memory:<id>``): their last issue, and what they asked of us."""
    lines: list[str] = []
    cited: list[str] = []
    past = next((m for m in remembered if m.kind == "summary"), None)
    if past is not None:
        lines.append(f"Welcome back! Last time you contacted us about: {past.content}")
        cited.append(f"memory:{past.id}")
    for wish in (m for m in remembered if m.kind in {"preference", "constraint"}):
        lines.append(f"Noted from before: {wish.content}")
        cited.append(f"memory:{wish.id}")
    return lines, cited


def _order_line(order: Mapping[str, Any]) -> str:
    oid, status, eta = order["order_id"], order["status"], order.get("eta")
    payment = order.get("payment") or {}
    if payment.get("charged_times", 1) > 1:
        return (
            f"I can see order {oid} was charged {payment['charged_times']} times; the "
            "duplicate charge will be refunded to your original payment method within "
            "3-5 business days."
        )
    if status == "delayed":
        return (
            f"Order {oid} is delayed with {order.get('carrier') or 'the carrier'}; the new "
            f"estimated delivery is {eta}."
        )
    if status == "shipped":
        return (
            f"Order {oid} shipped with {order.get('carrier')} (tracking "
            f"{order.get('tracking_number')}), estimated {eta}; if it is past that date we "
            "will open a carrier trace."
        )
    if status == "processing":
        return f"Order {oid} is still being prepared; the estimated delivery is {eta}."
    return f"Order {oid} is {status}."


def _first_sentence(text: str, limit: int = 300) -> str:
    sentence = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 1] + "…"
