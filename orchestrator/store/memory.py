"""Long-term memory in Postgres (pgvector + full text), always scoped to one tenant.

Recall is hybrid: cosine similarity over the embeddings of the current embedder
fused (reciprocal rank fusion) with full-text ranking over any embedder's rows.

The vector half must not starve a small tenant. The HNSW index is global and
pgvector before 0.8 filters its candidates by tenant only after the scan (at
most ``hnsw.ef_search`` of them), so a tenant holding 0.5 % of the rows gets
next to nothing. Where iterative scans exist (pgvector >= 0.8) the scan keeps
going until enough rows passed the filter. Older versions:

- count the tenant's eligible rows, bounded (``exact_limit + 1``, index-only);
- at most ``exact_limit``: exact search over the tenant's rows only (the scope
  index, no HNSW): cheap at that size, and exact;
- more: HNSW with ``ef_search`` sized by the tenant's share of the index; too
  few rows back, widen once to the maximum; still too few, exact search.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from pgvector import Vector

from orchestrator.store import Conn, tenancy
from orchestrator.store.migrations import LOCK as MIGRATION_LOCK

Mode = Literal["exact", "hnsw", "hnsw-widened", "hnsw+exact-fallback", "hnsw-iterative", "none"]
Connect = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]

RRF_K = 60  # reciprocal rank fusion's damping constant (Cormack et al.)
EF_SEARCH_MAX = 1000  # pgvector's upper bound for hnsw.ef_search
EF_SEARCH_MIN = 40  # pgvector's default
ITERATIVE_SCANS = (0, 8, 0)  # the pgvector version that filters during the scan
_WORD = re.compile(r"\w+")
_IDENTIFIER = re.compile(r"\w*\d\w*")  # a word with a digit: a code, an order number
_MAX_TERMS = 32

# A re-seeded row is rewritten only when something changed (or it needs the current
# embedder's vector): an unchanged upsert leaves the row, and the HNSW graph, alone.
UPSERT = """
INSERT INTO memories (tenant_id, customer_id, kind, key, content, metadata, embedder,
                      embedding, confidence, source_workflow, source_step, source_message)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::text::public.vector, $9, $10, $11, $12)
ON CONFLICT (tenant_id, customer_id, kind, key) DO UPDATE
SET content = EXCLUDED.content, metadata = EXCLUDED.metadata, embedder = EXCLUDED.embedder,
    embedding = EXCLUDED.embedding, confidence = EXCLUDED.confidence,
    source_workflow = EXCLUDED.source_workflow, source_step = EXCLUDED.source_step,
    source_message = EXCLUDED.source_message, updated_at = now()
WHERE (memories.content, memories.metadata, memories.embedder, memories.confidence)
      IS DISTINCT FROM (EXCLUDED.content, EXCLUDED.metadata, EXCLUDED.embedder,
                        EXCLUDED.confidence)
   OR memories.embedding IS NULL
RETURNING id
"""
MEMORY_ID = """
SELECT id FROM memories WHERE tenant_id = $1 AND customer_id = $2 AND kind = $3 AND key = $4
"""
# The plan of a recall in one round trip: the tenant's eligible rows counted up to $4
# (index-only on memories_scope), the pgvector version, the rows in the HNSW index.
PLAN = """
SELECT (SELECT count(*) FROM (SELECT 1 FROM memories
                              WHERE tenant_id = $1 AND embedder = $2
                                AND customer_id = ANY($3::text[])
                              LIMIT $4) AS scope) AS scoped,
       (SELECT extversion FROM pg_extension WHERE extname = 'vector') AS version,
       (SELECT reltuples FROM pg_class WHERE oid = to_regclass('memories_embedding'))
           AS indexed
"""
# Exact: distances over the tenant's rows only. MATERIALIZED keeps the planner from
# serving the ORDER BY with the global HNSW index (which would starve again).
VECTOR_EXACT = """
WITH scope AS MATERIALIZED (
    SELECT id, embedding OPERATOR(public.<=>) $4::text::public.vector AS distance
    FROM memories
    WHERE tenant_id = $1 AND embedder = $2 AND customer_id = ANY($3::text[])
      AND ($5::text[] IS NULL OR kind = ANY($5::text[])) AND embedding IS NOT NULL
)
SELECT id, distance FROM scope ORDER BY distance, id LIMIT $6
"""
# Approximate: the HNSW scan (at most hnsw.ef_search candidates), filtered afterwards.
VECTOR_HNSW = """
SELECT id, embedding OPERATOR(public.<=>) $4::text::public.vector AS distance
FROM memories
WHERE tenant_id = $1 AND embedder = $2 AND customer_id = ANY($3::text[])
  AND ($5::text[] IS NULL OR kind = ANY($5::text[])) AND embedding IS NOT NULL
ORDER BY embedding OPERATOR(public.<=>) $4::text::public.vector
LIMIT $6
"""
SET_EF_SEARCH = "SELECT set_config('hnsw.ef_search', $1::int::text, true)"
# pgvector >= 0.8: keep scanning until LIMIT rows passed the filter, in exact order.
SET_ITERATIVE = "SELECT set_config('hnsw.iterative_scan', 'strict_order', true)"
# Full text over any embedder's rows (GIN memories_search): rows holding every word of
# the query ($4, websearch syntax: "quoted phrases", -excluded), or any of its
# identifier-like words ($5: those with a digit, joined by "or"; NULL when none), which
# are what a vector misses (codes, order numbers). Never any word alone: a common word
# matches most rows, and ranking them all would cost more than the whole recall.
TEXT = """
SELECT id, ts_rank_cd(search, coalesce(strict || ids, strict)) AS rank
FROM memories,
     websearch_to_tsquery('english', $4) AS strict,
     websearch_to_tsquery('english', $5) AS ids
WHERE tenant_id = $1 AND customer_id = ANY($2::text[])
  AND ($3::text[] IS NULL OR kind = ANY($3::text[]))
  AND (search @@ strict OR search @@ ids)
ORDER BY rank DESC, id
LIMIT $6
"""
# The recalled rows; last_used_at (decay) moves at most daily, so a hot memory is not
# rewritten (a new tuple, new index entries) on every recall.
FETCH_AND_TOUCH = """
WITH touched AS (
    UPDATE memories SET last_used_at = now()
    WHERE id = ANY($1::bigint[])
      AND (last_used_at IS NULL OR last_used_at < now() - interval '1 day')
)
SELECT id, customer_id, kind, key, content, metadata, confidence,
       source_workflow, source_step, source_message
FROM memories WHERE id = ANY($1::bigint[])
"""
EMBEDDING_DIMENSIONS = """
SELECT atttypmod FROM pg_attribute
WHERE attrelid = to_regclass('memories') AND attname = 'embedding'
"""
DROP_HNSW = "DROP INDEX IF EXISTS memories_embedding"
# Postgres formats the statement (%s of an int); Python formats nothing into SQL.
# USING NULL: the old vectors came from another embedder, never compared again (their
# rows stay for full text); the rewrite is not subject to row-level security.
ALTER_DIMENSIONS = """
SELECT format('ALTER TABLE memories ALTER COLUMN embedding TYPE public.vector(%s) '
              'USING NULL::public.vector', $1::int)
"""
CREATE_HNSW = (
    "CREATE INDEX memories_embedding ON memories USING hnsw (embedding public.vector_cosine_ops)"
)


@dataclass(frozen=True, slots=True)
class Memory:
    """A recalled memory with its provenance. ``score`` is its fused score (reciprocal
    rank fusion: the sum of 1 / (60 + rank) over the lists it is in); ``vector_score``
    its cosine similarity to the query and ``text_rank`` its full-text rank, or None
    when it was not in that list."""

    id: int
    customer_id: str
    kind: str
    key: str
    content: str
    metadata: dict[str, Any]
    confidence: float
    source_workflow: UUID | None
    source_step: UUID | None
    source_message: int | None
    score: float
    vector_score: float | None = None
    text_rank: float | None = None


@dataclass(frozen=True, slots=True)
class Recall:
    """What a recall found, best first, and how the vector half searched (``mode``:
    exact, hnsw, hnsw-widened, hnsw+exact-fallback, hnsw-iterative, or none when the
    query has no vector)."""

    mode: Mode
    memories: tuple[Memory, ...]


async def remember(
    conn: Conn,
    *,
    tenant_id: str,
    customer_id: str = "",
    kind: str,
    key: str,
    content: str,
    metadata: dict[str, Any],
    embedder: str,
    embedding: list[float],
    confidence: float = 1.0,
    source_workflow: UUID | None = None,
    source_step: UUID | None = None,
    source_message: int | None = None,
) -> int:
    """Upsert the memory ``(tenant_id, customer_id, kind, key)``; return its id. A row that
    differs (content, metadata, confidence, or another ``embedder``) is overwritten and
    re-embedded; an identical one is left alone. No gate: seeding and tests use it."""
    args = (tenant_id, customer_id, kind, key)
    async with tenancy.scoped(conn, tenant_id):
        found = await conn.fetchval(
            UPSERT,
            *args,
            content,
            metadata,
            embedder,
            Vector(embedding).to_text(),
            confidence,
            source_workflow,
            source_step,
            source_message,
        )
        if found is None:  # unchanged: the upsert's update was skipped
            found = await conn.fetchval(MEMORY_ID, *args)
    return int(found)


async def recall(
    conn: Conn,
    *,
    tenant_id: str,
    customer_ids: Sequence[str],
    query: str,
    embedding: list[float],
    embedder: str,
    k: int,
    kinds: Sequence[str] | None,
    exact_limit: int,
    hybrid: bool = True,
) -> Recall:
    """The ``k`` memories of ``tenant_id`` (of ``customer_ids``; ``""`` is tenant-wide)
    best matching ``query``, in one tenant-scoped transaction. Only rows of ``embedder``
    are compared by vector; with ``hybrid`` the full-text ranking (any embedder's rows)
    is fused in. Recalled memories get their ``last_used_at`` moved (decay)."""
    customers = list(dict.fromkeys(customer_ids))
    kind_list = list(kinds) if kinds is not None else None
    depth = max(2 * k, 10)  # each list's length: fusion needs more than the top k
    async with tenancy.scoped(conn, tenant_id):
        mode: Mode = "none"
        vector: list[tuple[int, float]] = []
        if any(embedding):  # an all-zero vector (no words) has no direction to compare
            scope = (tenant_id, embedder, customers)
            mode, vector = await _vector(
                conn, scope, Vector(embedding).to_text(), kind_list, depth, exact_limit
            )
        text: list[tuple[int, float]] = []
        if hybrid and _WORD.search(query):
            codes = " or ".join(_IDENTIFIER.findall(query)[:_MAX_TERMS]) or None
            rows = await conn.fetch(TEXT, tenant_id, customers, kind_list, query, codes, depth)
            text = [(r["id"], float(r["rank"])) for r in rows]
        fused = _fuse(vector if hybrid else vector[:k], text)[:k]
        ids = [memory_id for memory_id, _ in fused]
        rows = await conn.fetch(FETCH_AND_TOUCH, ids) if ids else []
    by_id = {r["id"]: r for r in rows}
    similarity = {memory_id: 1.0 - distance for memory_id, distance in vector}
    ranks = dict(text)
    memories = tuple(
        _memory(by_id[memory_id], score, similarity.get(memory_id), ranks.get(memory_id))
        for memory_id, score in fused
        if memory_id in by_id
    )
    return Recall(mode, memories)


async def _vector(
    conn: Conn,
    scope: tuple[str, str, list[str]],
    vector: str,
    kinds: list[str] | None,
    depth: int,
    exact_limit: int,
) -> tuple[Mode, list[tuple[int, float]]]:
    """The vector list, nearest first, and the mode that found it (module docstring)."""
    plan = await conn.fetchrow(PLAN, *scope, exact_limit + 1)
    assert plan is not None
    args = (*scope, vector, kinds, depth)
    if plan["scoped"] <= exact_limit:
        return "exact", await _rows(conn, VECTOR_EXACT, args)
    if _version(plan["version"]) >= ITERATIVE_SCANS:
        await conn.execute(SET_ITERATIVE)
        await conn.execute(SET_EF_SEARCH, max(EF_SEARCH_MIN, depth))
        found = await _rows(conn, VECTOR_HNSW, args)
        if len(found) >= depth:
            return "hnsw-iterative", found
        return "hnsw+exact-fallback", await _rows(conn, VECTOR_EXACT, args)
    indexed = max(float(plan["indexed"] or 0), float(plan["scoped"]))
    # The tenant's share is at least scoped / indexed (the count stopped there); aim for
    # four times ``depth`` of its rows among the candidates.
    share = plan["scoped"] / indexed if indexed > 0 else 0.0
    ef = EF_SEARCH_MAX if share <= 0 else math.ceil(4 * depth / share)
    ef = min(max(ef, EF_SEARCH_MIN, depth), EF_SEARCH_MAX)
    await conn.execute(SET_EF_SEARCH, ef)
    found = await _rows(conn, VECTOR_HNSW, args)
    if len(found) >= depth:
        return "hnsw", found
    if ef < EF_SEARCH_MAX:
        await conn.execute(SET_EF_SEARCH, EF_SEARCH_MAX)
        found = await _rows(conn, VECTOR_HNSW, args)
        if len(found) >= depth:
            return "hnsw-widened", found
    return "hnsw+exact-fallback", await _rows(conn, VECTOR_EXACT, args)


async def _rows(conn: Conn, sql: str, args: tuple[Any, ...]) -> list[tuple[int, float]]:
    return [(r["id"], float(r["distance"])) for r in await conn.fetch(sql, *args)]


def _fuse(*lists: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: each id scores the sum of 1 / (RRF_K + rank) over the
    lists it is in (rank from 1); best first, ties by id."""
    scores: dict[int, float] = {}
    for ranked in lists:
        for rank, (memory_id, _) in enumerate(ranked, start=1):
            scores[memory_id] = scores.get(memory_id, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(scores.items(), key=lambda item: (-item[1], item[0]))


def _version(text: str | None) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text or "")
    return tuple(int(p) for p in parts[:3])


def _memory(row: Any, score: float, vector: float | None, text: float | None) -> Memory:
    return Memory(
        id=row["id"],
        customer_id=row["customer_id"],
        kind=row["kind"],
        key=row["key"],
        content=row["content"],
        metadata=row["metadata"],
        confidence=float(row["confidence"]),
        source_workflow=row["source_workflow"],
        source_step=row["source_step"],
        source_message=row["source_message"],
        score=score,
        vector_score=vector,
        text_rank=text,
    )


async def ensure_dimension(conn: Conn, dimensions: int) -> bool:
    """Make ``memories.embedding`` a ``vector(dimensions)``; return whether it changed.

    On a change, in one transaction under the migration lock: the HNSW index is
    dropped, every embedding set to NULL (made by an embedder of another dimension:
    kept for full text, never compared), the column's type changed, the index rebuilt.
    Run it as the schema's owner, after migrations.
    """
    async with conn.transaction():
        await conn.execute(MIGRATION_LOCK)
        if await conn.fetchval(EMBEDDING_DIMENSIONS) == dimensions:
            return False
        await conn.execute(DROP_HNSW)
        await conn.execute(await conn.fetchval(ALTER_DIMENSIONS, dimensions))
        await conn.execute(CREATE_HNSW)
    return True


class MemoryStore:
    """Long-term memory behind named operations; each borrows a pooled connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def remember(
        self,
        *,
        tenant_id: str,
        customer_id: str = "",
        kind: str,
        key: str,
        content: str,
        metadata: dict[str, Any],
        embedder: str,
        embedding: list[float],
        confidence: float = 1.0,
        source_workflow: UUID | None = None,
        source_step: UUID | None = None,
        source_message: int | None = None,
    ) -> int:
        """``remember`` (module function) on a pooled connection."""
        async with self._connect() as conn:
            return await remember(
                conn,
                tenant_id=tenant_id,
                customer_id=customer_id,
                kind=kind,
                key=key,
                content=content,
                metadata=metadata,
                embedder=embedder,
                embedding=embedding,
                confidence=confidence,
                source_workflow=source_workflow,
                source_step=source_step,
                source_message=source_message,
            )

    async def recall(
        self,
        *,
        tenant_id: str,
        customer_ids: Sequence[str],
        query: str,
        embedding: list[float],
        embedder: str,
        k: int,
        kinds: Sequence[str] | None,
        exact_limit: int,
        hybrid: bool = True,
    ) -> Recall:
        """``recall`` (module function) on a pooled connection."""
        async with self._connect() as conn:
            return await recall(
                conn,
                tenant_id=tenant_id,
                customer_ids=customer_ids,
                query=query,
                embedding=embedding,
                embedder=embedder,
                k=k,
                kinds=kinds,
                exact_limit=exact_limit,
                hybrid=hybrid,
            )
