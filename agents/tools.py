"""Tools of the support pipeline over bundled data: orders, help center, past tickets.

All are reads, so they are registered as idempotent: running one again after
a crash has no effect beyond the first run.
"""

from __future__ import annotations

import json
import re
from functools import cache
from importlib import resources
from typing import Any

from orchestrator.step.context import current

_WORD = re.compile(r"[a-z0-9]+")
MIN_SCORE = 2.0  # below this an article shares only incidental words with the query
_STOP = frozenset(
    "a about after again all am an and any are as at be been but by can could do does for from "
    "had has have hello hi how i if in into is it its just me my no not of on or our please so "
    "than thanks that the their them then there these they this to up us was we were what when "
    "where whether which will with would you your".split()
)


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


@cache
def load(name: str) -> list[dict[str, Any]]:
    """A bundled data file (``data/<name>``), read once and cached: do not modify it."""
    data: list[dict[str, Any]] = json.loads(
        resources.files("orchestrator.agents").joinpath("data", name).read_text(encoding="utf-8")
    )
    return data


async def lookup_order(order_id: str, customer_id: str) -> dict[str, Any] | None:
    """The order, only if it belongs to this customer (never leak another customer's order)."""
    for order in load("orders.json"):
        if order["order_id"] == order_id.upper() and order["customer_id"] == customer_id:
            return order
    return None


async def orders_for_customer(customer_id: str) -> list[dict[str, Any]]:
    """Every order of this customer, whatever its status."""
    return [o for o in load("orders.json") if o["customer_id"] == customer_id]


@cache
def _indexed_articles() -> list[tuple[dict[str, Any], tuple[set[str], set[str], set[str]]]]:
    return [
        (a, (_words(a["title"]), _words(" ".join(a["tags"])), _words(a["body"])))
        for a in load("help_center.json")
    ]


async def search_help_center(
    query: str, category: str | None = None, limit: int = 2
) -> list[dict[str, Any]]:
    """Keyword search: words shared with title, tags and body, boosted for the same category."""
    words = _words(query)
    scored = []
    for article, (title, tags, body) in _indexed_articles():
        score = 3 * len(words & tags) + 2 * len(words & title) + 0.5 * len(words & body)
        if category and article["category"] == category:
            score *= 1.5
        if score >= MIN_SCORE:
            scored.append((score, article))
    scored.sort(key=lambda pair: (-pair[0], pair[1]["id"]))
    return [
        {"id": a["id"], "title": a["title"], "snippet": a["body"], "score": round(s, 2)}
        for s, a in scored[:limit]
    ]


async def search_past_tickets(query: str, limit: int = 2) -> list[dict[str, Any]]:
    """This tenant's resolved tickets most like ``query`` (hybrid recall of the
    tenant-wide ``past_ticket`` memories); ``score`` is the cosine similarity."""
    found = await current().memory.recall(query, k=limit, kinds=["past_ticket"])
    return [
        {
            "id": m.key,
            "subject": m.metadata.get("subject", ""),
            "resolution": m.metadata.get("resolution", ""),
            "score": round(m.vector_score or 0.0, 3),
        }
        for m in found
    ]
