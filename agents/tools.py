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

from orchestrator.context import current

_WORD = re.compile(r"[a-z0-9]+")


@cache
def load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(
        resources.files("agents").joinpath("data", name).read_text(encoding="utf-8")
    )
    return data


async def lookup_order(order_id: str, customer_id: str) -> dict[str, Any] | None:
    """The order, only if it belongs to this customer (never leak another customer's order)."""
    for order in load("orders.json"):
        if order["order_id"] == order_id.upper() and order["customer_id"] == customer_id:
            return order
    return None


async def orders_for_customer(customer_id: str) -> list[dict[str, Any]]:
    return [o for o in load("orders.json") if o["customer_id"] == customer_id]


async def search_help_center(
    query: str, category: str | None = None, limit: int = 2
) -> list[dict[str, Any]]:
    """Keyword search: words shared with title, tags and body, boosted for the same category."""
    words = set(_WORD.findall(query.lower()))
    scored = []
    for article in load("help_center.json"):
        title = set(_WORD.findall(article["title"].lower()))
        tags = set(_WORD.findall(" ".join(article["tags"]).lower()))
        body = set(_WORD.findall(article["body"].lower()))
        score = 3 * len(words & tags) + 2 * len(words & title) + 0.5 * len(words & body)
        if category and article["category"] == category:
            score *= 1.5
        if score > 0:
            scored.append((score, article))
    scored.sort(key=lambda pair: (-pair[0], pair[1]["id"]))
    return [
        {"id": a["id"], "title": a["title"], "snippet": a["body"], "score": round(s, 2)}
        for s, a in scored[:limit]
    ]


async def search_past_tickets(query: str, limit: int = 2) -> list[dict[str, Any]]:
    """Semantic search (pgvector) over this tenant's resolved tickets."""
    found = await current().search_memory("past_ticket", query, limit=limit)
    return [
        {
            "id": m.key,
            "subject": m.metadata.get("subject", ""),
            "resolution": m.metadata.get("resolution", ""),
            "score": round(m.score, 3),
        }
        for m in found
    ]
