"""Semantic memory (pgvector) is scoped to one tenant in the storage layer."""

from __future__ import annotations

import pytest

from orchestrator.models.embeddings import embed_offline
from orchestrator.runtime import Runtime
from orchestrator.store import memory
from tests.conftest import fetch

pytestmark = pytest.mark.anyio


async def test_search_finds_the_closest_memory_of_the_same_tenant_only(support: Runtime) -> None:
    text = "Refund the duplicate charge on the customer's card"
    async with support.pool.acquire() as conn:
        await memory.remember(
            conn,
            tenant_id="acme",
            kind="note",
            key="secret-acme",
            content=text,
            metadata={},
            embedder="offline",
            embedding=embed_offline(text),
        )
        await memory.remember(
            conn,
            tenant_id="globex",
            kind="note",
            key="globex-other",
            content="Reset the two-factor device",
            metadata={},
            embedder="offline",
            embedding=embed_offline("two-factor reset"),
        )
        acme = await memory.search(
            conn,
            tenant_id="acme",
            kind="note",
            embedding=embed_offline("duplicate charge refund"),
            limit=5,
        )
        globex = await memory.search(
            conn,
            tenant_id="globex",
            kind="note",
            embedding=embed_offline("duplicate charge refund"),
            limit=5,
        )
    assert [m.key for m in acme] == ["secret-acme"] and acme[0].score > 0.3
    assert [m.key for m in globex] == ["globex-other"]  # never another tenant's memory


async def test_past_tickets_seeded_per_tenant(support: Runtime) -> None:
    rows = await fetch(
        support,
        "SELECT tenant_id, count(*) AS n FROM memories "
        "WHERE kind = 'past_ticket' GROUP BY tenant_id ORDER BY 1",
    )
    assert [(r["tenant_id"], r["n"]) for r in rows] == [
        ("acme", 16),
        ("default", 16),
        ("globex", 16),
    ]
