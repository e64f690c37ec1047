"""Long-term memory recall: per tenant in storage, right for a tenant of any size, hybrid,
cached per session in Redis, and a schema that follows the embedding dimension."""

from __future__ import annotations

import random
import uuid
from typing import Any

import pytest
from pgvector import Vector

from orchestrator.coordination import recall_cache
from orchestrator.runtime import Runtime
from orchestrator.step.info import StepInfo
from orchestrator.step.recall import recall_for_step
from orchestrator.store import memory, tenancy
from tests.conftest import fetch, owner_connection

pytestmark = pytest.mark.anyio

# One statement for every row (no round trip per row): 256 random floats each.
GENERATE = """
INSERT INTO memories (tenant_id, customer_id, kind, key, content, embedder, embedding)
SELECT CASE WHEN g <= $1::int THEN 'small' ELSE 'big' END, '', 'note', 'n' || g,
       'generated note ' || g, $3,
       (SELECT array_agg(random() - 0.5) FROM generate_series(1, 256) WHERE g > 0)::public.vector
FROM generate_series(1, $1::int + $2::int) AS g
"""
SPARSE_HNSW = """
CREATE INDEX memories_embedding ON memories
USING hnsw (embedding public.vector_cosine_ops) WITH (m = 8, ef_construction = 32)
"""
# The truth: every row of the tenant by distance, no index.
EXACT = """
SELECT key FROM (
    SELECT key, embedding <=> $2::text::public.vector AS distance
    FROM memories WHERE tenant_id = $1 AND embedding IS NOT NULL OFFSET 0
) AS scope ORDER BY distance LIMIT $3
"""


async def _recall(runtime: Runtime, tenant: str, query: str, **options: Any) -> memory.Recall:
    embedding = options.pop("embedding", None) or await runtime.embedder.embed(query)
    args: dict[str, Any] = {
        "customer_ids": [""],
        "k": 5,
        "kinds": None,
        "exact_limit": runtime.settings.recall_exact_limit,
        "embedder": runtime.embedder.name,
        **options,
    }
    return await runtime.store.memory.recall(
        tenant_id=tenant, query=query, embedding=embedding, **args
    )


async def _remember(runtime: Runtime, tenant: str, key: str, content: str, **fields: Any) -> int:
    return await runtime.store.memory.remember(
        tenant_id=tenant,
        kind=fields.pop("kind", "note"),
        key=key,
        content=content,
        metadata={},
        embedder=fields.pop("embedder", runtime.embedder.name),
        embedding=fields.pop("embedding", None) or await runtime.embedder.embed(content),
        **fields,
    )


async def test_a_small_tenant_among_a_big_one_gets_its_nearest_rows(support: Runtime) -> None:
    async with owner_connection(support) as conn:
        # Loading into a built HNSW graph row by row takes 20 s; building it after, with
        # a sparser graph, a quarter of one.
        await conn.execute("DROP INDEX memories_embedding")
        await conn.execute(GENERATE, 40, 3000, support.embedder.name)
        await conn.execute(SPARSE_HNSW)
        await conn.execute("ANALYZE memories")
    query = [random.uniform(-0.5, 0.5) for _ in range(256)]
    truth = [r["key"] for r in await fetch(support, EXACT, "small", Vector(query).to_text(), 5)]
    exact = await _recall(support, "small", "", embedding=query, hybrid=False)
    assert exact.mode == "exact" and [m.key for m in exact.memories] == truth
    # Forced onto the global HNSW index (filtered by tenant afterwards): the strategy
    # widens the scan, then falls back to exact, instead of returning (next to) nothing.
    forced = await _recall(support, "small", "", embedding=query, hybrid=False, exact_limit=0)
    assert forced.mode in ("hnsw", "hnsw-widened", "hnsw+exact-fallback")
    assert len(forced.memories) == 5 and len({m.key for m in forced.memories} & set(truth)) >= 4
    assert all(m.key.startswith("n") and int(m.key[1:]) <= 40 for m in forced.memories)
    big = await _recall(support, "big", "", embedding=query, hybrid=False, exact_limit=1000)
    assert big.mode.startswith("hnsw") and len(big.memories) == 5
    assert all(int(m.key[1:]) > 40 for m in big.memories)  # never another tenant's rows
    # The exact path never touches the HNSW index; the HNSW path does (as the application
    # role sees it: under row-level security).
    args = ("big", support.embedder.name, [""], Vector(query).to_text(), None, 10)
    async with support.pool.acquire() as conn, tenancy.scoped(conn, "big"):
        plans = {
            name: "\n".join(r[0] for r in await conn.fetch("EXPLAIN " + sql, *args))
            for name, sql in (("exact", memory.VECTOR_EXACT), ("hnsw", memory.VECTOR_HNSW))
        }
    assert "memories_embedding" not in plans["exact"]
    assert "Index Scan using memories_embedding" in plans["hnsw"]


async def test_recall_is_per_tenant_customer_and_embedder(support: Runtime) -> None:
    text = "Refund the duplicate charge on the card"
    await _remember(support, "acme", "mine", text, customer_id="c1")
    await _remember(support, "acme", "shared", "Duplicate charges are refunded in 5 days")
    await _remember(support, "acme", "theirs", text, customer_id="c2")
    await _remember(support, "globex", "secret", text, customer_id="c1")
    # Same vector as the query, but another embedder's: never compared.
    await _remember(
        support, "acme", "alien", "unrelated words", embedder="other-256", customer_id="c1"
    )
    found = await _recall(support, "acme", text, customer_ids=["c1", ""], kinds=["note"])
    assert {m.key for m in found.memories} == {"mine", "shared"}
    assert found.memories[0].key == "mine" and found.memories[0].vector_score == pytest.approx(1)
    alien = await _recall(
        support,
        "acme",
        "unrelated words",
        customer_ids=["c1"],
        embedding=await support.embedder.embed(text),
        hybrid=False,
    )
    assert [m.key for m in alien.memories] == ["mine"]
    hybrid = await _recall(support, "acme", "unrelated words", customer_ids=["c1"])
    by_key = {m.key: m for m in hybrid.memories}
    assert by_key["alien"].vector_score is None and by_key["alien"].text_rank
    used = await fetch(support, "SELECT key FROM memories WHERE last_used_at IS NOT NULL")
    assert {r["key"] for r in used} == {"mine", "shared", "alien"}


async def test_hybrid_finds_a_rare_word_the_vector_misses(support: Runtime) -> None:
    for n in range(8):
        await _remember(support, "acme", f"login-{n}", f"Login error code on the app, case {n}")
    await _remember(
        support,
        "acme",
        "rare",
        "The warehouse scanner shows E4521 after the firmware update; reboot it twice",
    )
    # An embedder that knows nothing of the code: its vector lands on the login notes.
    blind = await support.embedder.embed("login error code")
    vector = await _recall(support, "acme", "E4521", embedding=blind, hybrid=False)
    assert "rare" not in [m.key for m in vector.memories]
    hybrid = await _recall(support, "acme", "E4521", embedding=blind)
    found = {m.key: m for m in hybrid.memories}
    assert found["rare"].vector_score is None and found["rare"].text_rank


async def test_recall_cache_hit_bump_and_corrupt_value(support: Runtime) -> None:
    info = StepInfo(
        workflow_id=uuid.uuid4(),
        step_id=uuid.uuid4(),
        seq=1,
        agent="research",
        attempt=1,
        tenant_id="acme",
        assigned_by="triage",
        pipeline="support",
        session_id="s1",
        customer_id="c1",
    )
    await _remember(support, "acme", "pref", "Prefers email over phone", customer_id="c1")
    first = await recall_for_step(support, info, "email or phone", kinds=["note"])
    second = await recall_for_step(support, info, "email or phone", kinds=["note"])
    assert not first.cached and second.cached and second.memories == first.memories
    assert [m["key"] for m in second.record()["memories"]] == ["pref"]

    await _remember(support, "acme", "pref2", "Email them before noon", customer_id="c1")
    await recall_cache.bump(support.redis, support.keys, "acme", "c1")
    third = await recall_for_step(support, info, "email or phone", kinds=["note"])
    assert not third.cached and {m.key for m in third.memories} == {"pref", "pref2"}

    key = support.keys.recall_cache("acme", "s1")
    for name in await support.redis.hkeys(key):
        await support.redis.hset(key, name, b"{not json")
    corrupt = await recall_for_step(support, info, "email or phone", kinds=["note"])
    assert not corrupt.cached and corrupt.memories == third.memories


async def test_ensure_dimension_follows_the_setting(support: Runtime) -> None:
    async with owner_connection(support) as conn:
        assert not await memory.ensure_dimension(conn, 256)
        assert await memory.ensure_dimension(conn, 8)
        assert not await memory.ensure_dimension(conn, 8)
        column = await conn.fetchval(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'memories'::regclass AND attname = 'embedding'"
        )
        left = await conn.fetchval("SELECT count(*) FROM memories WHERE embedding IS NOT NULL")
        kept = await conn.fetchval("SELECT count(*) FROM memories")
        index = await conn.fetchval("SELECT to_regclass('memories_embedding') IS NOT NULL")
    assert column == "vector(8)" and left == 0 and kept > 0 and index


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
