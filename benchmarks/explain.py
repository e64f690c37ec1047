"""Benchmark: query plans of the hot-path SQL on a large history (1,000,000 finished workflows).

Starts a private PostgreSQL 16 + pgvector (tests/fault/servers.py), migrates a
schema, fills it with INSERT ... SELECT generate_series (per finished workflow: a
session shared with ~1.5 others, 3 steps and their attempts and checkpoints, 2
tool runs, 5 events, 2 messages; plus a few hundred running, waiting, stalled and
session-queued workflows), runs ANALYZE, then prints EXPLAIN (ANALYZE, BUFFERS) of
every hot-path statement with realistic parameters, imported from the store
modules (writes inside a rolled-back transaction, after one rolled-back warm-up
run), and a summary table: top node, indexes used, Seq Scans on big tables
(flagged), rows, execution and trigger ms, buffers (each node's own, summed).

    PYTHONPATH=. python benchmarks/explain.py --workflows 1000000
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import anyio

from orchestrator.connections import create_pool
from orchestrator.store import Conn, prune, recovery, steps, tool_runs, workflows
from orchestrator.store.migrations import migrate
from orchestrator.store.tool_runs import ToolRun
from tests.fault.servers import PostgresServer

SCHEMA = "explain_bench"
SERVER = {"shared_buffers": "512MB", "max_wal_size": "8GB", "maintenance_work_mem": "256MB"}
# $1 finished workflows, $2 sessions, $3 running workflows. Oldest first, over 90 days.
FILL = [
    """INSERT INTO sessions (id, tenant_id, customer_id, created_at)
    SELECT 'session-' || s, 'tenant-' || s % 20, 'cus-' || s, now() - interval '91 days'
    FROM generate_series(1, $2::int) s""",
    """INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state, error,
        app_version, created_at, updated_at, completed_at, submit_key)
    SELECT md5('w' || g)::uuid, 'tenant-' || (g % $2 + 1) % 20, 'session-' || (g % $2 + 1),
        'support', st, jsonb_build_object('ticket', t), jsonb_build_object('ticket', t,
            'triage', jsonb_build_object('category', 'billing', 'priority', 'normal',
                'summary', 'Customer reports a duplicate charge on an order'),
            'research', jsonb_build_object('orders', jsonb_build_array('ORD-' || g),
                'articles', jsonb_build_array('kb-refunds', 'kb-billing')),
            'response', jsonb_build_object('reply', repeat('We are sorry. ', 8))),
        CASE WHEN st = 'failed' THEN 'response: RuntimeError: boom' END, '0.1.0', c, c + d, c + d,
        CASE WHEN g % 3 = 0 THEN 'key-' || g END
    FROM generate_series(1, $1::int) g,
        LATERAL (SELECT now() - interval '90 days' + g * (interval '89 days' / $1::int) AS c,
                        interval '4 seconds' AS d,
                        CASE g % 100 WHEN 0 THEN 'failed' WHEN 1 THEN 'cancelled'
                             ELSE 'completed' END AS st,
                        jsonb_build_object('customer_id', 'cus-' || g,
                            'subject', 'Order ORD-' || g || ' was charged twice',
                            'body', repeat('I was charged twice for my order. ', 3)) AS t) x""",
    """INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, attempt, input,
        output, error, created_at, updated_at, completed_at)
    SELECT md5('s' || g || ':' || k)::uuid, md5('w' || g)::uuid, k,
        (ARRAY['triage', 'research', 'response'])[k + 1],
        (ARRAY['submit', 'triage', 'research'])[k + 1],
        CASE WHEN k < 2 OR g % 100 > 1 THEN 'completed' WHEN g % 100 = 0 THEN 'failed'
             ELSE 'cancelled' END, 1,
        jsonb_build_object('ticket', jsonb_build_object('customer_id', 'cus-' || g,
            'subject', 'Order ORD-' || g, 'body', repeat('charged twice ', 4))),
        jsonb_build_object('ok', true, 'seq', k), NULL, c, c + k * i, c + k * i
    FROM generate_series(1, $1::int) g, generate_series(0, 2) k,
        LATERAL (SELECT now() - interval '90 days' + g * (interval '89 days' / $1::int) AS c,
                        interval '1 second' AS i) x""",
    """INSERT INTO step_attempts (step_id, attempt, worker, outcome, started_at, finished_at,
        model, model_calls, prompt_tokens, completion_tokens)
    SELECT id, 1, 'worker-1', CASE WHEN status = 'failed' THEN 'failed' ELSE 'completed' END,
        created_at, completed_at, 'offline-rules-v1', 1, 300, 120
    FROM steps WHERE status IN ('completed', 'failed')""",
    """INSERT INTO checkpoints (workflow_id, seq, agent, state, created_at)
    SELECT workflow_id, seq, agent, output, completed_at FROM steps WHERE status = 'completed'""",
    """INSERT INTO tool_runs (idempotency_key, workflow_id, step_id, ordinal, tool, attempt,
        status, args, result, started_at, finished_at)
    SELECT s.workflow_id || ':1:' || o, s.workflow_id, s.id, o,
        (ARRAY['lookup_order', 'search_help_center'])[o + 1], 1, 'succeeded',
        jsonb_build_object('order_id', 'ORD-1'), jsonb_build_object('status', 'shipped'),
        s.created_at, s.completed_at
    FROM steps s, generate_series(0, 1) o WHERE s.seq = 1""",
    """INSERT INTO events (workflow_id, step_id, type, data, created_at)
    SELECT w.id, CASE WHEN e BETWEEN 1 AND 3 THEN md5('s' || g || ':' || e - 1)::uuid END,
        (ARRAY['workflow.submitted', 'step.completed', 'step.completed', 'step.completed',
               'workflow.completed'])[e + 1], jsonb_build_object('attempt', 1),
        w.created_at + e * interval '1 second'
    FROM generate_series(1, $1::int) g, generate_series(0, 4) e,
        LATERAL (SELECT md5('w' || g)::uuid AS id,
                 now() - interval '90 days' + g * (interval '89 days' / $1::int) AS created_at) w
    ORDER BY g, e""",
    """INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content,
        created_at)
    SELECT session_id, tenant_id, id, r, CASE WHEN r = 'customer' THEN 'cus' ELSE 'response' END,
        'Order was charged twice; we refunded the duplicate.', created_at
    FROM workflows, unnest(ARRAY['customer', 'agent']) r ORDER BY created_at""",
    # Live work: $3 running (every 10th waiting for input, every 7th stalled 5 min),
    # each at step 1 or 2, plus 20 workflows queued behind them in their sessions.
    """INSERT INTO sessions (id, tenant_id, customer_id)
    SELECT 'live-' || r, 'tenant-' || r % 20, 'live-' || r FROM generate_series(1, $3::int) r""",
    """INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state,
        app_version, created_at, updated_at)
    SELECT md5('r' || r)::uuid, 'tenant-' || r % 20, 'live-' || r, 'support',
        CASE WHEN r % 10 = 0 THEN 'waiting' ELSE 'running' END, '{}'::jsonb,
        '{"ticket": {}}'::jsonb, '0.1.0',
        now() - interval '1 minute', now()
    FROM generate_series(1, $3::int) r
    UNION ALL
    SELECT md5('q' || r)::uuid, 'tenant-' || r % 20, 'live-' || r, 'support', 'queued', '{}'::jsonb,
        '{"ticket": {}}'::jsonb, '0.1.0', now(), now()
    FROM generate_series(1, 20) r""",
    """INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, input, updated_at,
        completed_at)
    SELECT md5('rs' || r || ':' || k)::uuid, md5('r' || r)::uuid, k,
        (ARRAY['triage', 'research', 'response'])[k + 1], 'submit',
        CASE WHEN k < 1 + r % 2 THEN 'completed' WHEN r % 10 = 0 THEN 'waiting'
             ELSE 'queued' END, '{"ticket": {}}'::jsonb,
        CASE WHEN r % 7 = 0 THEN now() - interval '5 minutes'
             ELSE now() - (r % 40) * interval '1 second' END,
        CASE WHEN k < 1 + r % 2 THEN now() - interval '30 seconds' END
    FROM generate_series(1, $3::int) r, generate_series(0, 2) k WHERE k <= 1 + r % 2
    UNION ALL
    SELECT md5('qs' || r)::uuid, md5('q' || r)::uuid, 0, 'triage', 'submit', 'queued',
        '{"ticket": {}}'::jsonb, now(), NULL
    FROM generate_series(1, 20) r""",
]
WIDTH = 160  # printed plan lines are cut here (long literal arrays)
BIG = 10_000  # rows: a Seq Scan on a table larger than this is flagged
SIZES = """
SELECT c.relname, c.reltuples::bigint AS rows, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = $1 AND c.relkind = 'r' ORDER BY bytes DESC
"""
OPEN_STEPS = """
SELECT s.id, s.workflow_id, s.seq, s.agent, s.attempt FROM steps s
JOIN workflows w ON w.id = s.workflow_id
WHERE s.status = 'queued' AND w.status = 'running' ORDER BY s.seq, s.id
"""

Setup = Callable[[Conn], Awaitable[None]]


@dataclass(frozen=True)
class Case:
    """One statement to explain, its parameters, and what must run before it (same tx)."""

    name: str
    sql: str
    args: list[Any]
    setup: Setup | None = None


async def fill(conn: Conn, n: int, running: int) -> None:
    await conn.execute("SET session_replication_role = replica")  # bulk load: no FK triggers
    counts = {"$1": n, "$2": max(1, n * 2 // 3), "$3": running}
    for sql in FILL:
        for name, value in counts.items():
            sql = sql.replace(name, str(value))
        start = time.perf_counter()
        status = await conn.execute(sql)
        table = re.search(r"INTO (\w+)", sql)
        print(
            f"  {table.group(1) if table else '?'}: {status} in {time.perf_counter() - start:.1f}s"
        )
    await conn.execute("RESET session_replication_role")
    start = time.perf_counter()
    await conn.execute("VACUUM ANALYZE")
    print(f"  VACUUM ANALYZE in {time.perf_counter() - start:.1f}s")


def completion_args(step: Any, final: bool) -> list[Any]:
    """The parameters steps.complete() passes for this step (two idempotent tool results)."""
    runs = [
        ToolRun(f"{step['workflow_id']}:{step['seq']}:{o}", o, "lookup_order", "succeeded", {})
        for o in range(2)
    ]
    nxt = [] if final else [uuid4()]
    events = [("step.completed", {"agent": step["agent"], "attempt": 1})]
    events += [("workflow.completed", {})] if final else []
    state = {"ticket": {"subject": "Order ORD-1 charged twice"}, "triage": {"ok": True}}
    return [
        step["id"],
        step["attempt"],
        {"ok": True},
        "worker-bench",
        datetime.now(UTC),
        *tool_runs.columns(runs),
        step["seq"],
        step["agent"],
        state,
        nxt,
        [step["seq"] + 1] * len(nxt),
        ["response"] * len(nxt),
        ["Here is what we found."],
        "completed" if final else "running",
        [t for t, _ in events],
        [json.dumps(d) for _, d in events],
        "offline-rules-v1",
        1,
        300,
        120,
        step["seq"] + 1 + len(nxt),  # the workflow's next step number
        True,  # alone in its workflow: the one-statement path
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # the next steps' parent
    ]


async def cases(conn: Conn, n: int) -> list[Case]:
    live = await conn.fetch(OPEN_STEPS)
    mid = next(s for s in live if s["seq"] == 1)
    last = next(s for s in live if s["seq"] == 2)
    finished = await conn.fetch(
        "SELECT id FROM workflows TABLESAMPLE SYSTEM (1) WHERE status = 'completed' LIMIT 480"
    )
    sample = [r["id"] for r in finished] + [s["workflow_id"] for s in live[:20]]
    # A returning customer: the session exists, its earlier workflows are finished.
    session, tenant = await conn.fetchrow(
        "SELECT id, tenant_id FROM sessions WHERE id = 'session-1'"
    )
    key = f"{mid['workflow_id']}:{mid['seq']}:9"
    ticket = {"ticket": {"customer_id": "cus-1", "subject": "Where is ORD-1?", "body": "Late."}}
    submit = [uuid4(), uuid4(), session, tenant, "cus-1", "support", ticket, "0.1.0"]
    submit += ["Where is ORD-1?\n\nLate.", "triage", {"pipeline": "support"}, f"key-{n + 1}"]
    submit += [True, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]  # consolidate
    prune_ids: list[UUID] = []  # filled by the claim before each delete

    async def start_call(c: Conn) -> None:
        await c.execute(tool_runs.INSERT_STARTED, key, mid["id"], 9, "refund", 1, {}, 30.0)

    async def claim(c: Conn) -> None:
        prune_ids[:] = [r["id"] for r in await c.fetch(prune.CLAIM_BATCH, 30 * 86400.0, 500)]

    beat = [s for s in live if s["seq"] >= 1][:16]
    return [
        Case("workflows.CREATE_WORKFLOW (submit)", workflows.CREATE_WORKFLOW, submit),
        Case("steps.SELECT_OPEN", steps.SELECT_OPEN, [mid["id"]]),
        Case(
            "steps.COMPLETE_STEP (handoff)",
            steps.COMPLETE_STEP,
            completion_args(mid, final=False),
        ),
        Case(
            "steps.COMPLETE_STEP (final)",
            steps.COMPLETE_STEP,
            completion_args(last, final=True),
        ),
        Case("steps.TAKE_OVER", steps.TAKE_OVER, [mid["id"], "worker-bench"]),
        Case(
            "tool_runs.INSERT_STARTED",
            tool_runs.INSERT_STARTED,
            [key, mid["id"], 9, "refund", 1, {"order_id": "ORD-1"}, 30.0],
        ),
        Case(
            "tool_runs.FINISH",
            tool_runs.FINISH,
            [key, 1, "succeeded", {"refund": "RF-1"}, None],
            setup=start_call,
        ),
        Case("recovery.SELECT_STALLED", recovery.SELECT_STALLED, [120.0, 500]),
        Case(
            "recovery.HEARTBEAT (16 steps)",
            recovery.HEARTBEAT,
            [[s["id"] for s in beat], [s["attempt"] for s in beat]],
        ),
        Case("recovery.STALLED_SESSIONS", recovery.STALLED_SESSIONS, [100]),
        Case(
            "workflows.SELECT_TERMINAL (500 ids)",
            workflows.SELECT_TERMINAL,
            [sample, ["completed", "failed", "cancelled"]],
        ),
        Case("prune.CLAIM_BATCH (500, 30 d)", prune.CLAIM_BATCH, [30 * 86400.0, 500]),
        *[
            Case(f"prune.{name}", getattr(prune, name), [prune_ids], setup=claim)
            for name in (
                "DELETE_CHECKPOINTS",
                "DELETE_EVENTS",
                "DELETE_ATTEMPTS",
                "DELETE_TOOL_RUNS",
            )
        ],
    ]


async def explain(conn: Conn, case: Case) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) after one warm-up run; writes are rolled back."""
    lines: list[str] = []
    for warm in (True, False):
        tx = conn.transaction()
        await tx.start()
        try:
            if case.setup is not None:
                await case.setup(conn)
            if warm:
                await conn.fetch(case.sql, *case.args)
            else:
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + case.sql, *case.args)
                lines = [r[0] for r in rows]
        finally:
            await tx.rollback()
    return lines


NODE = re.compile(
    r"^(\s*)(?:->\s+)?([A-Z][A-Za-z ]*?)(?: using (\S+))?(?: on (\S+)(?: \S+)?)?\s+\(cost="
)
ACTUAL = re.compile(r"actual time=[\d.]+\.\.([\d.]+) rows=(\d+) loops=(\d+)")
BUFFERS = re.compile(r"(hit|read|dirtied|written)=(\d+)")
KINDS = ("hit", "read", "dirtied")


def nodes(lines: list[str]) -> list[dict[str, Any]]:
    """Plan nodes (kind, index, table, own buffers), from EXPLAIN's text format.

    A node's own buffers are its total minus its children's. A CTE Scan's total is the
    CTE's work, already counted in the CTE's own subtree: it owns nothing itself.
    """
    found: list[dict[str, Any]] = []
    stack: list[dict[str, Any]] = []
    for line in lines:
        if line.startswith("Planning"):
            break
        match = NODE.match(line)
        if match:
            indent = len(match.group(1))
            while stack and stack[-1]["indent"] >= indent:
                stack.pop()
            item = {"indent": indent, "kind": match.group(2), "index": match.group(3)}
            item |= {"table": match.group(4), "total": {}, "kids": {}, "parent": stack[-1:]}
            stack.append(item)
            found.append(item)
        elif "Buffers: shared" in line and stack:
            node = stack[-1]
            node["total"] = {k: int(v) for k, v in BUFFERS.findall(line)}
            for parent in node["parent"]:
                for k, v in node["total"].items():
                    parent["kids"][k] = parent["kids"].get(k, 0) + v
    return found


def summarize(lines: list[str], big: set[str]) -> dict[str, Any]:
    """Top node, indexes, Seq Scans (big tables flagged), rows, ms, and buffers."""
    plan = nodes(lines)
    own = {
        k: sum(
            max(0, n["total"].get(k, 0) - n["kids"].get(k, 0))
            for n in plan
            if n["kind"] != "CTE Scan"
        )
        for k in KINDS
    }
    indexes = [n["index"] or n["table"] for n in plan if "Index" in n["kind"]]
    seq = [
        n["table"] + (" (BIG)" if n["table"] in big else "")
        for n in plan
        if n["kind"] == "Seq Scan"
    ]
    text = "\n".join(lines)
    top = ACTUAL.search(lines[0])

    def ms(label: str) -> float:
        return sum(float(t) for t in re.findall(label + r"[^\n]*?(?:time=|: )([\d.]+)", text))

    return {
        "top": plan[0]["kind"] if plan else lines[0][:30],
        "indexes": ", ".join(dict.fromkeys(indexes)) or "-",
        "seq": ", ".join(dict.fromkeys(seq)) or "-",
        "rows": top.group(2) if top else "?",
        "ms": ms("Execution Time"),
        "plan_ms": ms("Planning Time"),
        "triggers": ms("Trigger"),
        "buffers": "/".join(str(own[k]) for k in KINDS),
    }


async def main(args: argparse.Namespace) -> None:
    with PostgresServer(settings=SERVER) as server:
        pool = await create_pool(server.url, schema=SCHEMA, size=2, timeout=600)
        async with pool.acquire() as conn:
            await conn.execute(f"CREATE SCHEMA {SCHEMA}")
            await migrate(conn)
            print(f"filling {args.workflows} finished + {args.running} live workflows")
            start = time.perf_counter()
            await fill(conn, args.workflows, args.running)
            print(f"fill: {time.perf_counter() - start:.0f}s\n")
            sizes = await conn.fetch(SIZES, SCHEMA)
            print("| table | rows | total size |\n|---|---|---|")
            for r in sizes:
                print(f"| {r['relname']} | {r['rows']:,} | {r['bytes'] / 2**20:,.0f} MB |")
            big = {r["relname"] for r in sizes if r["rows"] > BIG}
            results = []
            for case in await cases(conn, args.workflows):
                lines = await explain(conn, case)
                shown = [ln if len(ln) <= WIDTH else ln[:WIDTH] + " ..." for ln in lines]
                print(f"\n=== {case.name}\n" + "\n".join(shown))
                results.append((case.name, summarize(lines, big)))
        await pool.close()
    print(
        "\n| query | top node | indexes | seq scans | rows | exec ms | plan ms | trigger ms "
        "| buffers hit/read/dirtied |\n|---|---|---|---|---|---|---|---|---|"
    )
    for name, s in results:
        print(
            f"| {name} | {s['top']} | {s['indexes']} | {s['seq']} | {s['rows']} | {s['ms']:.3f} "
            f"| {s['plan_ms']:.3f} | {s['triggers']:.3f} | {s['buffers']} |"
        )
    flagged = [name for name, s in results if "(BIG)" in s["seq"]]
    print(f"\nSeq Scan on a big table (> {BIG:,} rows): {', '.join(flagged) or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=1_000_000, help="finished workflows")
    parser.add_argument("--running", type=int, default=300, help="live (running/waiting) ones")
    anyio.run(main, parser.parse_args())
