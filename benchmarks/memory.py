"""Benchmark: long-term memory recall at 100k memories (a script, not a test).

Loads ``--rows`` support-like memories embedded by the offline lexical embedder
(256 floats) into a private schema, three tenants holding 0.5 %, 5 % and 94.5 %
of the rows, then again with one tenant holding all of them. For each tenant it
prints recall@5 of ``store.memory.recall`` (vector only) against exact search
(a sequential scan ordered by distance, no index) over ``--queries`` queries,
the search modes recall chose, and p50/p95 latency of vector-only and hybrid
recall (one tenant-scoped transaction each, as the application role). A second
pass forces every tenant onto the HNSW index (``exact_limit=0``) to show that
the widening and the fallback keep a small tenant's recall.

Without ``--database-url`` an embedded Postgres (pgvector 0.6) starts in a
temporary directory; with it, connect as a superuser (the load writes every
tenant's rows past row-level security).

    PYTHONPATH=. python benchmarks/memory.py [--rows 100000] [--queries 200]

Then, unless ``--recall-only``, the other memory figures, each from its own
script on its own embedded servers: Redis bytes per active session and Postgres
bytes per 500-turn session (``memory_sizes.py``), and consolidation throughput
and lag draining a backlog of completed workflows (``consolidation.py``).
More figures on the recall schema plug in with ``@figure``: an async function of
``Bench`` returning ``{name: value}``, printed after the recall table.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pgvector import Vector

from orchestrator.connections import create_pool
from orchestrator.embedded import embedded_postgres
from orchestrator.models.embeddings import LexicalEmbedder, embed_offline
from orchestrator.settings import Settings
from orchestrator.store import memory
from orchestrator.store.migrations import migrate

K = 5
EMBEDDER = LexicalEmbedder(256)
LOAD = """
INSERT INTO memories (tenant_id, customer_id, kind, key, content, embedder, embedding)
SELECT t, c, 'fact', k, body, $6, e::public.vector
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[]) AS r(t, c, k, body, e)
"""
DROP_HNSW = "DROP INDEX IF EXISTS memories_embedding"
BUILD_HNSW = "CREATE INDEX memories_embedding ON memories USING hnsw (embedding vector_cosine_ops)"
# The truth: the tenant's rows by distance, every one of them (no index).
EXACT = """
SELECT embedding <=> $2::text::vector AS distance FROM memories
WHERE tenant_id = $1 AND customer_id = '' AND embedder = $3
ORDER BY 1 LIMIT $4
"""
DISTANCES = """
SELECT id, embedding <=> $2::text::vector AS distance FROM memories WHERE id = ANY($1::bigint[])
"""

# Support-like text: enough vocabulary that neighbours are neither all alike nor random.
PRODUCTS = "router modem app invoice subscription card wallet scanner printer laptop".split()
ISSUES = (
    "cannot log in|double charge|refund not received|slow sync|crash on start|"
    "password reset loop|missing invoice|wrong address|late delivery|two-factor code"
).split("|")
PLACES = "checkout|settings page|mobile app|web portal|billing page|shipping form".split("|")
PREFS = (
    "prefers email|prefers phone calls|wants short answers|speaks French|"
    "on the premium plan|business account|asks for a manager|works nights"
).split("|")
FIXES = (
    "cleared the cache|reissued the card|refunded the charge|reset the device|"
    "updated the firmware|escalated to billing|sent a new link|changed the plan"
).split("|")


def text(rng: random.Random) -> str:
    """A support-like memory: an issue, where, a preference, what worked, a code."""
    return (
        f"The {rng.choice(PRODUCTS)} showed {rng.choice(ISSUES)} on the {rng.choice(PLACES)}; "
        f"customer {rng.choice(PREFS)}. We {rng.choice(FIXES)} and {rng.choice(FIXES)}. "
        f"Code E{rng.randrange(10_000):04d}, order {rng.randrange(1_000_000)}."
    )


@dataclass
class Bench:
    """What a figure gets: the server, the benchmark's schema, a pool as the app role."""

    dsn: str
    schema: str
    pool: asyncpg.Pool
    args: argparse.Namespace


Figure = Callable[[Bench], Awaitable[dict[str, str]]]
FIGURES: list[Figure] = []


def figure(fn: Figure) -> Figure:
    """Register another figure, printed after the recall table."""
    FIGURES.append(fn)
    return fn


async def owner(bench: Bench) -> asyncpg.Connection:
    """A connection as the schema's owner (sees every tenant)."""
    return await asyncpg.connect(
        bench.dsn, server_settings={"search_path": f"{bench.schema},public"}
    )


async def load(bench: Bench, shares: dict[str, float], rng: random.Random) -> None:
    """Replace the memories by ``--rows`` rows split among tenants by ``shares``; HNSW
    built once after the load (inserting into a built graph is far slower)."""
    conn = await owner(bench)
    try:
        await conn.execute("TRUNCATE memories")
        await conn.execute(DROP_HNSW)
        tenants = [t for t, share in shares.items() for _ in range(round(share * bench.args.rows))]
        for start in range(0, len(tenants), 5000):
            batch = tenants[start : start + 5000]
            bodies = [text(rng) for _ in batch]
            vectors = [Vector(embed_offline(b, 256)).to_text() for b in bodies]
            keys = [f"m{start + i}" for i in range(len(batch))]
            await conn.execute(LOAD, batch, [""] * len(batch), keys, bodies, vectors, EMBEDDER.name)
        await conn.execute("SET maintenance_work_mem = '512MB'")
        started = time.perf_counter()
        await conn.execute(BUILD_HNSW)
        print(f"  loaded {len(tenants)} rows, HNSW built in {time.perf_counter() - started:.1f} s")
        await conn.execute("VACUUM ANALYZE memories")
    finally:
        await conn.close()


async def measure(
    bench: Bench, tenant: str, queries: list[str], exact_limit: int
) -> dict[str, Any]:
    """recall@K against exact search, the modes used, and latencies (ms) for one tenant."""
    conn = await owner(bench)
    hits, modes, vector_ms, hybrid_ms = 0, collections.Counter[str](), [], []
    try:
        await conn.execute("SET enable_indexscan = off")  # the truth uses no index
        await conn.execute("SELECT set_config('orchestrator.tenant', $1, false)", tenant)
        async with bench.pool.acquire() as app:
            for query in queries:
                embedding = embed_offline(query, 256)
                args: dict[str, Any] = {
                    "tenant_id": tenant,
                    "customer_ids": [""],
                    "query": query,
                    "embedding": embedding,
                    "embedder": EMBEDDER.name,
                    "k": K,
                    "kinds": None,
                    "exact_limit": exact_limit,
                }
                started = time.perf_counter()
                found = await memory.recall(app, **args, hybrid=False)
                vector_ms.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                await memory.recall(app, **args, hybrid=True)
                hybrid_ms.append((time.perf_counter() - started) * 1000)
                modes[found.mode] += 1
                q = Vector(embedding).to_text()
                truth = await conn.fetch(EXACT, tenant, q, EMBEDDER.name, K)
                # A tie with the K-th nearest counts as a hit (duplicate texts exist).
                bound = truth[-1]["distance"] + 1e-9 if truth else 0.0
                got = await conn.fetch(DISTANCES, [m.id for m in found.memories], q)
                hits += sum(1 for r in got if r["distance"] <= bound)
                hits += K - len(truth)  # a tenant with fewer than K rows: nothing to miss
    finally:
        await conn.close()
    return {
        "recall": hits / (K * len(queries)),
        "modes": ", ".join(f"{m} {n}" for m, n in modes.most_common()),
        "vector": _percentiles(vector_ms),
        "hybrid": _percentiles(hybrid_ms),
    }


def _percentiles(ms: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(ms, n=20)
    return statistics.median(ms), cuts[18]


async def run(bench: Bench) -> list[dict[str, Any]]:
    """Both layouts (three tenants; one tenant), each with the default exact limit and
    with every tenant forced onto HNSW."""
    rng = random.Random(7)
    queries = [text(rng) for _ in range(bench.args.queries)]
    layouts = [
        {"small-0.5%": 0.005, "mid-5%": 0.05, "big-94.5%": 0.945},
        {"solo-100%": 1.0},
    ]
    rows = []
    for shares in layouts:
        await load(bench, shares, rng)
        for limit in (bench.args.exact_limit, 0):
            for tenant in shares:
                result = await measure(bench, tenant, queries, limit)
                rows.append({"tenant": tenant, "exact_limit": limit, **result})
                print(f"  {tenant} exact_limit={limit}: recall@{K} {result['recall']:.3f}")
    return rows


def report(rows: list[dict[str, Any]], rows_total: int, queries: int) -> None:
    """The recall table."""
    print(f"\nrecall@{K} vs exact search, {rows_total} memories, {queries} queries per tenant")
    head = f"{'tenant':<12} {'exact_limit':>11} {'recall@5':>8} {'vector p50/p95 ms':>18}"
    print(head + f" {'hybrid p50/p95 ms':>18}  modes")
    for r in rows:
        vector = "{:.1f} / {:.1f}".format(*r["vector"])
        hybrid = "{:.1f} / {:.1f}".format(*r["hybrid"])
        print(
            f"{r['tenant']:<12} {r['exact_limit']:>11} {r['recall']:>8.3f} "
            f"{vector:>18} {hybrid:>18}  {r['modes']}"
        )


@contextlib.asynccontextmanager
async def bench_schema(args: argparse.Namespace) -> AsyncIterator[Bench]:
    """A private schema (dropped after) on ``--database-url`` or an embedded Postgres."""
    with contextlib.ExitStack() as stack:
        dsn = args.database_url or stack.enter_context(
            embedded_postgres(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "pg")
        )
        schema = f"bench_memory_{secrets.token_hex(4)}"
        conn = await asyncpg.connect(dsn, server_settings={"search_path": f"{schema},public"})
        try:
            await conn.execute(
                await conn.fetchval("SELECT format('CREATE SCHEMA %I', $1::text)", schema)
            )
            await migrate(conn)
            pool = await create_pool(dsn, schema=schema, size=2)
            try:
                yield Bench(dsn, schema, pool, args)
            finally:
                await pool.close()
        finally:
            await conn.execute(
                await conn.fetchval("SELECT format('DROP SCHEMA %I CASCADE', $1::text)", schema)
            )
            await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--exact-limit", type=int, default=Settings().recall_exact_limit)
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument("--recall-only", action="store_true", help="skip sizes and consolidation")
    parser.add_argument("--turns", type=int, default=500, help="transcript messages (sizes)")
    parser.add_argument("--workflows", type=int, default=2000, help="to consolidate")
    args = parser.parse_args()
    async with bench_schema(args) as bench:
        rows = await run(bench)
        report(rows, args.rows, args.queries)
        for fn in FIGURES:
            for name, value in (await fn(bench)).items():
                print(f"{name}: {value}")
    if args.json:
        print(json.dumps(rows))
    if not args.recall_only:
        await _other_figures(args)


async def _other_figures(args: argparse.Namespace) -> None:
    """Sizes and consolidation, from their own scripts (siblings of this one)."""
    import consolidation  # type: ignore[import-not-found]
    import memory_sizes  # type: ignore[import-not-found]

    print("\n# working memory and transcript sizes")
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as home:
        sizes = argparse.Namespace(turns=args.turns)
        memory_sizes.report(await memory_sizes.bench(sizes, Path(home)))
    print("\n# consolidation")
    drain = argparse.Namespace(workflows=args.workflows, customers=200, consolidators=[1, 2])
    await consolidation.bench(drain)


if __name__ == "__main__":
    asyncio.run(main())
