"""The memory gate: what a consolidation may add to a customer's long-term memory.

Per candidate, in order:

1. confidence below the floor: **dropped**;
2. the customer has a memory of the same kind and key (its subject slot): the same
   content (or as similar as a near-duplicate) is **merged**; different content is a
   contradiction, and the older fact is **updated** (the previous version kept in
   ``metadata.previous``);
3. the customer has a memory of the same kind whose embedding (same embedder) is at
   least ``merge_similarity`` similar (cosine): **merged** into it;
4. else **added**.

A merge counts one more mention, keeps the higher confidence and the first source
(the columns), and records the newest source in ``metadata.latest_source``; the
content is not duplicated. Runs inside the caller's transaction, which must be
scoped to the tenant (``tenancy.scoped``): row-level security is the tenant filter,
the ``tenant_id`` conditions only help the planner. Consolidations of one customer
are serialized by a transaction-level advisory lock, so two at once never both add
the same fact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from pgvector import Vector

from orchestrator.store import Conn

# One customer's consolidations one at a time (released at commit or rollback).
LOCK_CUSTOMER = "SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 9))"
SAME_KEY = """
SELECT id, content,
       CASE WHEN embedder = $5 AND embedding IS NOT NULL
            THEN 1 - (embedding OPERATOR(public.<=>) $6::text::public.vector) END AS similarity
FROM memories
WHERE tenant_id = $1 AND customer_id = $2 AND kind = $3 AND key = $4
"""
# Ordered by similarity, not by the distance operator: the customer's few rows are
# ranked exactly (through memories_scope), never through the global HNSW index.
NEAREST = """
SELECT id, 1 - (embedding OPERATOR(public.<=>) $5::text::public.vector) AS similarity
FROM memories
WHERE tenant_id = $1 AND customer_id = $2 AND kind = $3 AND embedder = $4
  AND embedding IS NOT NULL
ORDER BY similarity DESC
LIMIT 1
"""
MERGE = """
UPDATE memories
SET mentions = mentions + 1, confidence = greatest(confidence, $2), updated_at = now(),
    metadata = metadata || jsonb_build_object('latest_source', $3::jsonb)
WHERE id = $1
"""
# The right-hand sides read the row as it was: that is the previous version.
CONTRADICT = """
UPDATE memories
SET metadata = metadata || jsonb_build_object('previous', jsonb_build_object(
        'content', content, 'confidence', confidence, 'mentions', mentions,
        'source_workflow', source_workflow, 'source_step', source_step,
        'source_message', source_message, 'updated_at', updated_at)),
    content = $2, embedder = $3, embedding = $4::text::public.vector, confidence = $5,
    source_workflow = $6, source_step = $7, source_message = $8, mentions = 1,
    updated_at = now()
WHERE id = $1
"""
INSERT = """
INSERT INTO memories (tenant_id, customer_id, kind, key, content, metadata, embedder,
                      embedding, confidence, source_workflow, source_step, source_message)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::public.vector, $9, $10, $11, $12)
"""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a memory came from: the workflow, step and transcript message."""

    workflow: UUID
    step: UUID | None
    message: int | None

    def as_json(self) -> dict[str, Any]:
        """The source as stored in a memory's metadata."""
        return {
            "workflow": str(self.workflow),
            "step": str(self.step) if self.step else None,
            "message": self.message,
        }


@dataclass(frozen=True, slots=True)
class Candidate:
    """A memory the gate is asked to admit, embedded by the embedder named in the call."""

    kind: str
    key: str
    content: str
    confidence: float
    embedding: list[float]
    source: Source
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class GateCounts:
    """What the gate did with the candidates of one consolidation."""

    added: int = 0
    merged: int = 0
    updated: int = 0
    dropped: int = 0

    def __add__(self, other: GateCounts) -> GateCounts:
        return GateCounts(
            self.added + other.added,
            self.merged + other.merged,
            self.updated + other.updated,
            self.dropped + other.dropped,
        )


async def admit(
    conn: Conn,
    *,
    tenant_id: str,
    customer_id: str,
    embedder: str,
    candidates: Sequence[Candidate],
    min_confidence: float,
    merge_similarity: float,
) -> GateCounts:
    """Apply the gate (see the module docstring) to ``candidates``, in order, within the
    caller's tenant-scoped transaction; returns what it did."""
    await conn.execute(LOCK_CUSTOMER, tenant_id, customer_id)
    counts = GateCounts()
    for c in candidates:
        counts = counts + await _admit_one(
            conn, tenant_id, customer_id, embedder, c, min_confidence, merge_similarity
        )
    return counts


async def _admit_one(
    conn: Conn,
    tenant_id: str,
    customer_id: str,
    embedder: str,
    c: Candidate,
    min_confidence: float,
    merge_similarity: float,
) -> GateCounts:
    if c.confidence < min_confidence:
        return GateCounts(dropped=1)
    vector = Vector(c.embedding).to_text()
    same = await conn.fetchrow(SAME_KEY, tenant_id, customer_id, c.kind, c.key, embedder, vector)
    if same is not None:
        similar = same["similarity"] is not None and same["similarity"] >= merge_similarity
        if similar or _normal(same["content"]) == _normal(c.content):
            await _merge(conn, same["id"], c)
            return GateCounts(merged=1)
        await conn.execute(
            CONTRADICT,
            same["id"],
            c.content,
            embedder,
            vector,
            c.confidence,
            c.source.workflow,
            c.source.step,
            c.source.message,
        )
        return GateCounts(updated=1)
    near = await conn.fetchrow(NEAREST, tenant_id, customer_id, c.kind, embedder, vector)
    if near is not None and near["similarity"] >= merge_similarity:
        await _merge(conn, near["id"], c)
        return GateCounts(merged=1)
    await conn.execute(
        INSERT,
        tenant_id,
        customer_id,
        c.kind,
        c.key,
        c.content,
        c.metadata,
        embedder,
        vector,
        c.confidence,
        c.source.workflow,
        c.source.step,
        c.source.message,
    )
    return GateCounts(added=1)


async def _merge(conn: Conn, memory_id: int, c: Candidate) -> None:
    await conn.execute(MERGE, memory_id, c.confidence, c.source.as_json())


def _normal(text: str) -> str:
    return " ".join(text.lower().split())
