"""Semantic memory in pgvector, always scoped to one tenant."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pgvector import Vector

from orchestrator.store import Conn, tenancy

UPSERT = """
INSERT INTO memories (tenant_id, kind, key, content, metadata, embedder, embedding)
VALUES ($1, $2, $3, $4, $5, $6, $7::text::public.vector)
ON CONFLICT (tenant_id, customer_id, kind, key) DO NOTHING
"""
# Cosine distance; the tenant filter lives here, in the storage layer.
SEARCH = """
SELECT key, content, metadata, 1 - (embedding OPERATOR(public.<=>) $3::text::public.vector) AS score
FROM memories
WHERE tenant_id = $1 AND kind = $2
ORDER BY embedding OPERATOR(public.<=>) $3::text::public.vector
LIMIT $4
"""


@dataclass(frozen=True, slots=True)
class Memory:
    """A remembered item found by ``search``; ``score`` is its cosine similarity."""

    key: str
    content: str
    metadata: dict[str, Any]
    score: float


async def remember(
    conn: Conn,
    *,
    tenant_id: str,
    kind: str,
    key: str,
    content: str,
    metadata: dict[str, Any],
    embedder: str,
    embedding: list[float],
) -> None:
    """Store an item for ``tenant_id``; a key the tenant already has for ``kind`` is kept
    as it was (nothing is overwritten). ``embedder`` names what made ``embedding``."""
    async with tenancy.scoped(conn, tenant_id):
        await conn.execute(
            UPSERT,
            tenant_id,
            kind,
            key,
            content,
            metadata,
            embedder,
            Vector(embedding).to_text(),
        )


async def search(
    conn: Conn, *, tenant_id: str, kind: str, embedding: list[float], limit: int
) -> list[Memory]:
    """The tenant's ``limit`` items of ``kind`` nearest to ``embedding``, most similar first."""
    async with tenancy.scoped(conn, tenant_id):
        rows = await conn.fetch(SEARCH, tenant_id, kind, Vector(embedding).to_text(), limit)
    return [Memory(r["key"], r["content"], r["metadata"], float(r["score"])) for r in rows]


class MemoryStore:
    """Long-term memory behind named operations; each borrows a pooled connection."""

    def __init__(self, connect: Any) -> None:
        self._connect = connect

    async def search(
        self, *, tenant_id: str, kind: str, embedding: list[float], limit: int
    ) -> list[Memory]:
        """Semantic search over one tenant's memories of ``kind``."""
        async with self._connect() as conn:
            return await search(
                conn, tenant_id=tenant_id, kind=kind, embedding=embedding, limit=limit
            )
