"""Seed a migrated runtime schema with N finished workflows, fast (INSERT ... SELECT).

``fill(conn, workflows)`` writes the history a runtime that has run ``workflows``
support tickets would keep (nothing pruned), oldest first over the last 90 days:

- per workflow: a 3-step linear pipeline (triage, research, response), one attempt
  row and one checkpoint per completed step, 2 tool runs (research), 5 events,
  2 transcript messages; 98 % completed, 1 % failed (the response step: a dead
  letter each), 1 % cancelled (at the response step);
- a session per ~1.5 workflows (returning customers), 20 tenants;
- consolidation: every completed workflow consolidates and was consolidated, except
  1 in 1,000 whose consolidation failed ``MAX_FAILURES`` (3) times and was given up
  (consolidated_at NULL, 3 open dead letters of the consolidation queue each), written
  as before migration V14 (still ``consolidate``): explain.py's last pass gives them up
  as V14 does.

``conn`` must be a superuser connection (the private servers' ``postgres``) whose
search_path starts with the migrated schema: the load skips foreign-key triggers
(``session_replication_role``) and row-level security, and drops the secondary
indexes for the load and builds them again after it (much faster than keeping them
up to date row by row). Row ids come from ``md5(prefix || ...)``: a second fill of
the same schema needs another ``prefix``.

    async with asyncpg.connect(url, server_settings={"search_path": "s,public"}) as conn:
        timings = await history.fill(conn, 1_000_000)

``python benchmarks/history.py --workflows 1000000`` times a fill on a private server.
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Callable

import anyio
import asyncpg

from orchestrator.store import Conn
from orchestrator.store.migrations import migrate

TABLES = (
    "sessions",
    "workflows",
    "steps",
    "step_attempts",
    "checkpoints",
    "tool_runs",
    "events",
    "messages",
    "dead_letters",
)
# Secondary indexes of the filled tables (not those of a primary key or unique
# constraint: foreign keys depend on those), kept to be built again after the load.
SAVE_INDEXES = """
CREATE TEMP TABLE fill_indexes ON COMMIT PRESERVE ROWS AS
SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS def
FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid
WHERE t.relnamespace = current_schema()::regnamespace AND t.relname = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
"""
DROP_INDEXES = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT name FROM fill_indexes LOOP
        EXECUTE 'DROP INDEX ' || r.name;  -- a regclass text: quoted as needed
    END LOOP;
END
$$
"""
CREATE_INDEXES = """
DO $$
DECLARE r record;
BEGIN
    FOR r IN SELECT def FROM fill_indexes LOOP
        EXECUTE r.def;
    END LOOP;
END
$$
"""
# $1 workflows, $2 the id prefix; 2 sessions for every 3 workflows. Workflow g was
# created at CREATED: evenly over days 90..1 before now; its steps ran a second apart.
SESSIONS = "greatest(1, $1::int * 2 / 3)"
CREATED = "now() - interval '90 days' + g * (interval '89 days' / $1::int)"
FILL = [
    f"""INSERT INTO sessions (id, tenant_id, customer_id, created_at)
    SELECT $2::text || 'session-' || s, 'tenant-' || s % 20, $2::text || 'cus-' || s,
        now() - interval '91 days'
    FROM generate_series(1, {SESSIONS}) s""",
    f"""INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state, error,
        app_version, created_at, updated_at, completed_at, submit_key, next_seq, open_steps,
        consolidate, consolidated_at, cost_usd)
    SELECT md5($2::text || 'w' || g)::uuid, 'tenant-' || s % 20, $2::text || 'session-' || s,
        'support', st, jsonb_build_object('ticket', t),
        jsonb_build_object('ticket', t,
            'triage', jsonb_build_object('category', 'billing', 'priority', 'normal',
                'summary', 'Customer reports a duplicate charge on an order'),
            'research', jsonb_build_object('orders', jsonb_build_array('ORD-' || g),
                'articles', jsonb_build_array('kb-refunds', 'kb-billing')),
            'response', jsonb_build_object('reply', repeat('We are sorry. ', 8))),
        CASE WHEN st = 'failed' THEN 'response: RuntimeError: boom' END, '0.1.0',
        c, c + interval '3 seconds', c + interval '3 seconds',
        CASE WHEN g % 3 = 0 THEN 'key-' || g END, 3, 0,
        st = 'completed', CASE WHEN st = 'completed' AND g % 1000 <> 502
                               THEN c + interval '5 seconds' END,
        CASE WHEN st = 'cancelled' THEN 0.0042 ELSE 0.0063 END
    FROM generate_series(1, $1::int) g,
        LATERAL (SELECT g % {SESSIONS} + 1 AS s) o,
        LATERAL (SELECT {CREATED} AS c,
                        CASE g % 100 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled'
                             ELSE 'completed' END AS st,
                        jsonb_build_object('customer_id', $2::text || 'cus-' || s,
                            'subject', 'Order ORD-' || g || ' was charged twice',
                            'body', repeat('I was charged twice for my order. ', 3)) AS t) x""",
    f"""INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, attempt, input,
        output, error, created_at, updated_at, completed_at, traceparent)
    SELECT md5($2::text || 's' || g || ':' || k)::uuid, md5($2::text || 'w' || g)::uuid, k,
        (ARRAY['triage', 'research', 'response'])[k + 1],
        (ARRAY['submit', 'triage', 'research'])[k + 1],
        CASE WHEN k < 2 OR g % 100 > 1 THEN 'completed' WHEN g % 100 = 0 THEN 'failed'
             ELSE 'cancelled' END, 1,
        jsonb_build_object('ticket', jsonb_build_object('customer_id', 'cus-' || g,
            'subject', 'Order ORD-' || g, 'body', repeat('charged twice ', 4))),
        CASE WHEN k < 2 OR g % 100 > 1 THEN jsonb_build_object('ok', true, 'seq', k) END,
        CASE WHEN k = 2 AND g % 100 = 0 THEN 'RuntimeError: boom' END,
        c + k * interval '1 second', c + (k + 1) * interval '1 second',
        c + (k + 1) * interval '1 second',
        '00-' || md5($2::text || 'w' || g) || '-' || left(md5($2::text || 's' || g || ':' || k), 16)
            || '-01'
    FROM generate_series(1, $1::int) g, generate_series(0, 2) k,
        LATERAL (SELECT {CREATED} AS c) x""",
    # Attempts, checkpoints and tool runs from the series too (not from the steps table:
    # a second fill, under another prefix, must not copy the first one's rows).
    f"""INSERT INTO step_attempts (step_id, attempt, worker, outcome, error, started_at,
        finished_at, model, model_calls, prompt_tokens, completion_tokens, cost_usd)
    SELECT md5($2::text || 's' || g || ':' || k)::uuid, 1, 'worker-1',
        CASE WHEN k = 2 AND g % 100 = 0 THEN 'failed' ELSE 'completed' END,
        CASE WHEN k = 2 AND g % 100 = 0 THEN 'RuntimeError: boom' END,
        c + k * interval '1 second', c + (k + 1) * interval '1 second', 'offline-rules-v1', 1,
        300, 120, 0.0021
    FROM generate_series(1, $1::int) g, generate_series(0, 2) k,
        LATERAL (SELECT {CREATED} AS c) x
    WHERE k < 2 OR g % 100 <> 1""",
    f"""INSERT INTO checkpoints (workflow_id, seq, agent, state, created_at)
    SELECT md5($2::text || 'w' || g)::uuid, k, (ARRAY['triage', 'research', 'response'])[k + 1],
        jsonb_build_object('ok', true, 'seq', k), {CREATED} + (k + 1) * interval '1 second'
    FROM generate_series(1, $1::int) g, generate_series(0, 2) k
    WHERE k < 2 OR g % 100 > 1""",
    f"""INSERT INTO tool_runs (idempotency_key, workflow_id, step_id, ordinal, tool, attempt,
        status, args, result, started_at, finished_at)
    SELECT md5($2::text || 'w' || g)::uuid || ':1:' || o, md5($2::text || 'w' || g)::uuid,
        md5($2::text || 's' || g || ':1')::uuid, o,
        (ARRAY['lookup_order', 'search_help_center'])[o + 1], 1, 'succeeded',
        jsonb_build_object('order_id', 'ORD-' || g), jsonb_build_object('status', 'shipped'),
        {CREATED} + interval '1 second', {CREATED} + interval '2 seconds'
    FROM generate_series(1, $1::int) g, generate_series(0, 1) o""",
    f"""INSERT INTO events (workflow_id, step_id, type, data, created_at)
    SELECT md5($2::text || 'w' || g)::uuid,
        CASE WHEN e BETWEEN 1 AND 3 THEN md5($2::text || 's' || g || ':' || e - 1)::uuid END,
        (ARRAY['workflow.submitted', 'step.completed', 'step.completed',
               CASE g % 100 WHEN 0 THEN 'step.failed' WHEN 1 THEN 'step.cancelled'
                    ELSE 'step.completed' END,
               CASE g % 100 WHEN 0 THEN 'workflow.failed' WHEN 1 THEN 'workflow.cancelled'
                    ELSE 'workflow.completed' END])[e + 1],
        jsonb_build_object('attempt', 1), {CREATED} + e * interval '1 second'
    FROM generate_series(1, $1::int) g, generate_series(0, 4) e
    ORDER BY g, e""",
    f"""INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content,
        created_at)
    SELECT $2::text || 'session-' || (g % {SESSIONS} + 1), 'tenant-' || (g % {SESSIONS} + 1) % 20,
        md5($2::text || 'w' || g)::uuid, r, CASE WHEN r = 'customer' THEN 'cus' ELSE 'response' END,
        CASE WHEN r = 'customer' THEN 'Order ORD-' || g || ' was charged twice.'
             ELSE 'We refunded the duplicate charge on ORD-' || g || '.' END,
        {CREATED} + CASE WHEN r = 'customer' THEN interval '0' ELSE interval '3 seconds' END
    FROM generate_series(1, $1::int) g, unnest(ARRAY['customer', 'agent']) r
    ORDER BY g, r DESC""",
    # Failed workflows: the failed step's dead letter. Given-up consolidations
    # (g % 1000 = 502): 3 each, as consolidator.MAX_FAILURES.
    f"""INSERT INTO dead_letters (workflow_id, step_id, agent, reason, envelope, created_at)
    SELECT md5($2::text || 'w' || g)::uuid, md5($2::text || 's' || g || ':2')::uuid, 'response',
        'RuntimeError: boom', '{{}}', {CREATED} + interval '3 seconds'
    FROM generate_series(1, $1::int) g WHERE g % 100 = 0
    UNION ALL
    SELECT md5($2::text || 'w' || g)::uuid, NULL, 'consolidation', 'RuntimeError: distiller failed',
        '{{}}', {CREATED} + k * interval '1 minute'
    FROM generate_series(1, $1::int) g, generate_series(1, 3) k WHERE g % 1000 = 502
    ORDER BY 6""",
]


def _table(sql: str) -> str:
    found = re.search(r"INTO (\w+)", sql)
    return found.group(1) if found else "?"


async def fill(
    conn: Conn | asyncpg.Connection,
    workflows: int,
    *,
    prefix: str = "",
    analyze: bool = True,
    log: Callable[[str], None] | None = print,
) -> dict[str, float]:
    """Write ``workflows`` finished workflows and their history (see the module doc) into
    the schema first on ``conn``'s search_path; VACUUM ANALYZE after, unless not
    ``analyze``. Returns seconds per phase (table names, "indexes", "analyze", "total")."""
    say = log or (lambda _: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    await conn.execute("SET session_replication_role = replica")  # no FK triggers
    await conn.execute("SET maintenance_work_mem = '256MB'")
    try:
        await conn.execute("DROP TABLE IF EXISTS fill_indexes")
        await conn.execute(SAVE_INDEXES, list(TABLES))
        await conn.execute(DROP_INDEXES)
        for sql in FILL:
            began = time.perf_counter()
            status = await conn.execute(sql, workflows, prefix)
            took = time.perf_counter() - began
            table = _table(sql)
            timings[table] = timings.get(table, 0.0) + took
            say(f"  {table}: {status} in {took:.1f}s")
        began = time.perf_counter()
        await conn.execute(CREATE_INDEXES)
        timings["indexes"] = time.perf_counter() - began
        say(f"  secondary indexes rebuilt in {timings['indexes']:.1f}s")
    finally:
        await conn.execute("DROP TABLE IF EXISTS fill_indexes")
        await conn.execute("RESET session_replication_role")
        await conn.execute("RESET maintenance_work_mem")
    if analyze:
        began = time.perf_counter()
        # The filled tables only (names from TABLES, not input): other schemas are not ours.
        await conn.execute("VACUUM ANALYZE " + ", ".join(TABLES))
        timings["analyze"] = time.perf_counter() - began
        say(f"  VACUUM ANALYZE in {timings['analyze']:.1f}s")
    timings["total"] = time.perf_counter() - start
    return timings


async def main(args: argparse.Namespace) -> None:
    from tests.fault.servers import PostgresServer

    settings = {"shared_buffers": "512MB", "max_wal_size": "8GB"}
    with PostgresServer(settings=settings) as server:
        conn = await asyncpg.connect(
            server.url, server_settings={"search_path": "history_bench,public"}
        )
        try:
            await conn.execute("CREATE SCHEMA history_bench")
            await migrate(conn)
            print(f"filling {args.workflows:,} finished workflows")
            timings = await fill(conn, args.workflows)
            print(f"fill: {timings['total']:.0f}s")
        finally:
            await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=1_000_000)
    anyio.run(main, parser.parse_args())
