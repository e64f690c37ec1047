"""Benchmark: query plans of the hot-path SQL on a large history (1,000,000 finished workflows).

Starts a private PostgreSQL 16 + pgvector (tests/fault/servers.py), migrates a
schema, fills it with ``benchmarks/history.py`` (finished workflows) plus a few
hundred live ones (running, waiting on a signal or a due timer, stalled, retry
scheduled, queued behind a session), runs VACUUM ANALYZE, then runs each hot-path
*operation* through the store's own functions (submit, open, complete, take over,
fail, park, signal, heartbeat, the reconciler's scans, timers, the tool ledger,
Client.wait's read, consolidation, pruning) on a connection that records every
statement they send, and prints EXPLAIN (ANALYZE, BUFFERS) of each recorded
statement (after one warm-up; every statement the operation sent before it
replayed first in the same transaction; all rolled back), as the application role
with row-level security on, like the runtime. The statement list is therefore
whatever the store sends today. For each statement it also asks for the generic
plan (EXPLAIN (GENERIC_PLAN), what asyncpg's cached prepared statement may switch to
after five runs) and shows its indexes when they differ.

Passes (each prints the plans and a table; then one table compares them):

1. ``small``: a ``--small`` history (default 100,000), to see what grows with it;
2. ``1,000,000``: the ``--workflows`` history;
3. ``running, stale``: ``--running`` (2,000) more workflows submitted at once (the
   store's submit), statistics left from before they existed; then the drain: every
   step of them opened and completed through the store (triage, research, response),
   one at a time, with the drain's index and table counters (pg_stat_user_indexes:
   index entries read, the figure that showed a plan growing with the table);
4. ``running, fresh``: the same after ANALYZE, and its drain;
5. ``queued, stale``: ``--running`` more over one session per 10 (returning customers:
   9 of 10 queue behind their session's first), and its drain (each finished workflow
   starts the next of its session);
6. the consolidation scans before and after the fill's given-up consolidations (written
   as before migration V14) are given up as V14 does (committed).

A statement is flagged when its buffers grow with the history (small -> 1M: at least
double and 20 more) or with the live work (1M -> a later pass), when it scans a big
table sequentially, or when its generic plan (what a prepared statement may switch to)
uses other indexes. Proposed rewrites (``proposals()``: same parameters) are explained
next to the statement they would replace, as "(proposed)".

    PYTHONPATH=. python benchmarks/explain.py --workflows 1000000
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast
from uuid import UUID, uuid4

import anyio
import asyncpg

from benchmarks import history
from orchestrator.connections import create_pool
from orchestrator.errors import Parked
from orchestrator.schemas import TaskEnvelope
from orchestrator.store import (
    Conn,
    branches,
    consolidation,
    dead_letters,
    envelopes,
    events,
    prune,
    recovery,
    steps,
    tenancy,
    tool_runs,
    waits,
    workflows,
)
from orchestrator.store.migrations import V14_GIVEN_UP_CONSOLIDATIONS, migrate
from orchestrator.store.tool_runs import ToolRun
from tests.fault.servers import PostgresServer

SERVER = {"shared_buffers": "512MB", "max_wal_size": "8GB", "maintenance_work_mem": "256MB"}
WIDTH = 160  # printed plan lines are cut here (long literal arrays)
BIG = 10_000  # rows: a Seq Scan on a table larger than this is flagged
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
STALL_AFTER = 60.0  # Settings().stall_after: twice the 30 s lease
# Live work: $1 running workflows (every 10th waiting: on a due timer or on a signal
# with a question; every 7th stalled 5 min; every 13th a retry scheduled in 30 s),
# each at step 1 or 2, plus 20 workflows queued behind them in their sessions, and 5
# queued in sessions whose workflows all finished (a lost promotion: stalled sessions).
LIVE = [
    """INSERT INTO sessions (id, tenant_id, customer_id)
    SELECT 'live-' || r, 'tenant-' || r % 20, 'live-' || r FROM generate_series(1, $1::int) r""",
    """INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state,
        app_version, created_at, updated_at, next_seq, open_steps, consolidate, cost_usd)
    SELECT md5('r' || r)::uuid, 'tenant-' || r % 20, 'live-' || r, 'support',
        CASE WHEN r % 10 = 0 THEN 'waiting' ELSE 'running' END, '{}'::jsonb,
        '{"ticket": {}}'::jsonb, '0.1.0', now() - interval '1 minute', now(), 2 + r % 2, 1,
        true, 0.0042
    FROM generate_series(1, $1::int) r
    UNION ALL
    SELECT md5('q' || r)::uuid, 'tenant-' || r % 20, 'live-' || r, 'support', 'queued',
        '{}'::jsonb, '{"ticket": {}}'::jsonb, '0.1.0', now(), now(), 1, 1, true, 0
    FROM generate_series(1, 20) r
    UNION ALL
    SELECT md5('z' || r)::uuid, 'tenant-' || (r + 1) % 20, 'session-' || r + 1, 'support',
        'queued', '{}'::jsonb, '{"ticket": {}}'::jsonb, '0.1.0', now(), now(), 1, 1, true, 0
    FROM generate_series(1, 5) r""",
    """INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, attempt, failures,
        input, updated_at, completed_at, not_before, waiting_for, question, traceparent)
    SELECT md5('rs' || r || ':' || k)::uuid, md5('r' || r)::uuid, k,
        (ARRAY['triage', 'research', 'response'])[k + 1], 'submit',
        CASE WHEN k < 1 + r % 2 THEN 'completed' WHEN r % 10 = 0 THEN 'waiting'
             ELSE 'queued' END,
        CASE WHEN open AND r % 13 = 0 THEN 2 ELSE 1 END,
        CASE WHEN open AND r % 13 = 0 THEN 1 ELSE 0 END,
        '{"ticket": {}}'::jsonb,
        CASE WHEN r % 7 = 0 THEN now() - interval '5 minutes'
             ELSE now() - (r % 40) * interval '1 second' END,
        CASE WHEN NOT open THEN now() - interval '30 seconds' END,
        CASE WHEN open AND r % 20 = 0 THEN now() - interval '10 seconds'
             WHEN open AND r % 13 = 0 THEN now() + interval '30 seconds' END,
        CASE WHEN open AND r % 20 = 10 THEN 'input' END,
        CASE WHEN open AND r % 20 = 10 THEN 'Refund 40 EUR?' END, $2::text
    FROM generate_series(1, $1::int) r, generate_series(0, 2) k,
        LATERAL (SELECT k = 1 + r % 2 AS open) o
    WHERE k <= 1 + r % 2
    UNION ALL
    SELECT md5('qs' || r)::uuid, md5('q' || r)::uuid, 0, 'triage', 'submit', 'queued', 1, 0,
        '{"ticket": {}}'::jsonb, now(), NULL, NULL, NULL, NULL, $2::text
    FROM generate_series(1, 20) r
    UNION ALL
    SELECT md5('zs' || r)::uuid, md5('z' || r)::uuid, 0, 'triage', 'submit', 'queued', 1, 0,
        '{"ticket": {}}'::jsonb, now(), NULL, NULL, NULL, NULL, $2::text
    FROM generate_series(1, 5) r""",
]
SIZES = """
SELECT c.relname, c.reltuples::bigint AS rows, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind = 'r' ORDER BY bytes DESC
"""
# Open steps of live workflows, as envelopes (what a worker holds).
LIVE_STEPS = """
SELECT s.id, s.workflow_id, s.seq, s.agent, s.assigned_by, s.attempt,
       coalesce(s.input, w.state) AS input, s.traceparent,
       s.status, s.updated_at < now() - interval '1 minute' AS stalled, s.not_before,
       s.waiting_for, w.tenant_id, w.pipeline, w.session_id, w.status AS workflow_status
FROM steps s JOIN workflows w ON w.id = s.workflow_id
WHERE s.status IN ('queued', 'waiting') ORDER BY w.created_at, s.seq, s.id
"""
COUNTERS = """
SELECT 'index ' || relname || '.' || indexrelname AS name, idx_scan AS scans,
       idx_tup_read AS entries, 0::bigint AS seq_rows
FROM pg_stat_user_indexes WHERE schemaname = current_schema()
UNION ALL
SELECT 'table ' || relname, seq_scan, 0, seq_tup_read
FROM pg_stat_user_tables WHERE schemaname = current_schema()
"""


def proposals() -> dict[str, str]:
    """Statement text -> its proposed rewrite (same parameters). None left: the
    completion's session check and SELECT_STALLED proposed here are the store's own now
    (their old and new plans are in the issue 11 note)."""
    return {}


BUFFERS_IO = """
SELECT coalesce(sum(heap_blks_hit + heap_blks_read + coalesce(idx_blks_hit, 0)
                    + coalesce(idx_blks_read, 0)), 0)::bigint
FROM pg_statio_user_tables WHERE schemaname = current_schema()
"""


# --------------------------------------------------------------------------- recording


@dataclass
class Call:
    sql: str
    args: tuple[Any, ...]


class Recorder:
    """A connection that records the statements a store function sends (and sends them)."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.calls: list[Call] = []

    async def _run(self, method: str, sql: str, *args: Any, **kw: Any) -> Any:
        self.calls.append(Call(sql, args))
        return await getattr(self.conn, method)(sql, *args, **kw)

    async def fetch(self, sql: str, *args: Any, **kw: Any) -> Any:
        return await self._run("fetch", sql, *args, **kw)

    async def fetchrow(self, sql: str, *args: Any, **kw: Any) -> Any:
        return await self._run("fetchrow", sql, *args, **kw)

    async def fetchval(self, sql: str, *args: Any, **kw: Any) -> Any:
        return await self._run("fetchval", sql, *args, **kw)

    async def execute(self, sql: str, *args: Any, **kw: Any) -> Any:
        return await self._run("execute", sql, *args, **kw)

    async def fetchmany(self, sql: str, args: Any, **kw: Any) -> Any:
        """A pipelined batch: recorded as one call per statement in it."""
        batch = list(args)
        self.calls.extend(Call(sql, tuple(a)) for a in batch)
        return await self.conn.fetchmany(sql, batch, **kw)

    def transaction(self) -> Any:
        return self.conn.transaction()  # nested in the recording's: a savepoint


Op = Callable[[Conn], Awaitable[Any]]


async def open_one(conn: Any, envelope: TaskEnvelope) -> steps.OpenStep:
    """The open read of one step (the store pipelines concurrent ones: a batch of one)."""
    [opened] = await steps.open_steps(conn, [envelope])
    return opened


@dataclass(frozen=True)
class Case:
    """A hot-path operation: a store function call on a recording connection."""

    name: str
    op: Op


def statement_names() -> dict[str, str]:
    """SQL text -> "module.NAME", for every SQL constant of the store modules."""
    names: dict[str, str] = {}
    for module in (
        branches,
        consolidation,
        dead_letters,
        events,
        prune,
        recovery,
        steps,
        tenancy,
        tool_runs,
        waits,
        workflows,
    ):
        for name, value in vars(module).items():
            if name.isupper() and isinstance(value, str):
                names.setdefault(value, f"{module.__name__.rsplit('.', 1)[1]}.{name}")
    return names


async def record(conn: Conn, op: Op) -> list[Call]:
    """The statements ``op`` sends, run in a transaction that is rolled back."""
    recorder = Recorder(conn)
    tx = conn.transaction()
    await tx.start()
    try:
        await op(cast(Conn, recorder))
    except Exception as exc:  # what it sent until then is still worth explaining
        print(f"(the operation raised {type(exc).__name__}: {exc})")
    finally:
        await tx.rollback()
    return recorder.calls


async def explain(
    conn: Conn, calls: list[Call], i: int, sql: str | None = None
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """EXPLAIN (ANALYZE, BUFFERS) of ``calls[i]`` (or of ``sql`` with its parameters) after
    ``calls[:i]`` (same transaction), after one warm-up; everything rolled back. Also the
    warm-up's result rows, without float columns (times since now() vary run to run)."""
    lines: list[str] = []
    result: list[tuple[Any, ...]] = []
    for warm in (True, False):
        tx = conn.transaction()
        await tx.start()
        try:
            for call in calls[:i]:
                await conn.execute(call.sql, *call.args)
            call = calls[i]
            text = sql or call.sql
            if warm:
                rows = await conn.fetch(text, *call.args)
                result = [tuple(v for v in r.values() if not isinstance(v, float)) for r in rows]
            else:
                rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + text, *call.args)
                lines = [r[0] for r in rows]
        finally:
            await tx.rollback()
    return lines, result


def generic_plan(server: PostgresServer, schema: str, sql: str) -> list[str]:
    """EXPLAIN (GENERIC_PLAN) as the application role: the plan a prepared statement may
    cache after five runs (psql: a bound parameter would make it a custom plan)."""
    out = server.psql(
        f"SET search_path TO {schema}, public; SET ROLE orchestrator_app; "
        f"SET orchestrator.engine = 'on'; EXPLAIN (GENERIC_PLAN) {sql}"
    )
    return out.splitlines()


# --------------------------------------------------------------------------- summaries

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


def indexes_of(plan: list[dict[str, Any]]) -> str:
    found = [n["index"] or n["table"] for n in plan if "Index" in n["kind"]]
    return ", ".join(dict.fromkeys(found)) or "-"


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
    seq = [
        n["table"] + (" (BIG)" if n["table"] in big else "")
        for n in plan
        if n["kind"] == "Seq Scan"
    ]
    text = "\n".join(lines)
    top = ACTUAL.search(lines[0]) if lines else None

    def ms(label: str) -> float:
        return sum(float(t) for t in re.findall(label + r"[^\n]*?(?:time=|: )([\d.]+)", text))

    return {
        "top": plan[0]["kind"] if plan else (lines[0][:30] if lines else "?"),
        "indexes": indexes_of(plan),
        "seq": ", ".join(dict.fromkeys(seq)) or "-",
        "rows": top.group(2) if top else "?",
        "ms": ms("Execution Time"),
        "triggers": ms("Trigger"),
        "buffers": own["hit"] + own["read"],
        "detail": "/".join(str(own[k]) for k in KINDS),
    }


@dataclass
class Result:
    key: tuple[str, int, str]  # (operation, position of the statement in it, variant)
    statement: str
    summary: dict[str, Any]
    generic: str  # the generic plan's indexes


@dataclass
class Pass:
    label: str
    results: list[Result] = field(default_factory=list)
    drain: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the cases


def ticket(customer: str) -> dict[str, Any]:
    return {"ticket": {"customer_id": customer, "subject": "Where is ORD-1?", "body": "Late."}}


def envelope_of(row: Any) -> TaskEnvelope:
    return envelopes.of_row(row)


def outcome(
    *, next_agents: tuple[str, ...], tools: int = 0, message: bool = False
) -> steps.Outcome:
    runs = [
        ToolRun(f"{uuid4()}:1:{o}", o, "lookup_order", "succeeded", {"order_id": "ORD-1"})
        for o in range(tools)
    ]
    return steps.Outcome(
        output={"ok": True},
        state={"ticket": {"subject": "Order ORD-1 charged twice"}, "triage": {"ok": True}},
        next_agents=next_agents,
        tool_runs=runs,
        messages=["Here is what we found."] if message else [],
        worker="worker-bench",
        started_at=datetime.now(UTC),
        usage=steps.ModelUse("offline-rules-v1", 1, 300, 120, Decimal("0.0021")),
        traceparent=TP,
    )


def submission(tenant: str, session: str | None, customer: str, key: str) -> workflows.Submission:
    return workflows.Submission(
        pipeline="support",
        first_agent="triage",
        state=ticket(customer),
        message="Where is ORD-1?\n\nLate.",
        tenant=tenant,
        session=session,
        customer=customer,
        app_version="0.1.0",
        key=key,
        traceparent=TP,
        consolidate=True,
    )


async def cases(conn: Conn) -> list[Case]:
    """The hot-path operations, on live rows picked from the filled tables."""
    live = await conn.fetch(LIVE_STEPS)
    runnable = [
        s
        for s in live
        if s["status"] == "queued"
        and s["workflow_status"] == "running"
        and not s["stalled"]
        and s["not_before"] is None
    ]
    mid = next(s for s in runnable if s["seq"] == 1)
    last = next(s for s in runnable if s["seq"] == 2)
    # A final step of a workflow that has another queued behind it in its session.
    queued_sessions = {s["session_id"] for s in live if s["workflow_status"] == "queued"}
    behind = next(s for s in runnable if s["session_id"] in queued_sessions)
    stalled = next(s for s in live if s["status"] == "queued" and s["stalled"])
    signal_wait = next(s for s in live if s["waiting_for"] == "input")
    env_mid, env_last, env_behind = envelope_of(mid), envelope_of(last), envelope_of(behind)
    opened_mid = await open_one(conn, env_mid)
    opened_last = await open_one(conn, env_last)
    beat = [(s["id"], s["attempt"]) for s in runnable[:16]]
    finished = await conn.fetch(
        "SELECT id FROM workflows TABLESAMPLE SYSTEM (1) WHERE status = 'completed' LIMIT 480"
    )
    sample = [r["id"] for r in finished] + [s["workflow_id"] for s in live[:20]]
    done_id: UUID = sample[0]
    given_up = await conn.fetchval(
        "SELECT id FROM workflows WHERE consolidate AND status = 'completed' "
        "AND consolidated_at IS NULL ORDER BY completed_at LIMIT 1"
    )
    found = await conn.fetchrow("SELECT id, tenant_id FROM sessions WHERE id = 'session-1'")
    assert found is not None, "the fill has no session-1"
    session, tenant = found["id"], found["tenant_id"]
    started = datetime.now(UTC)
    use = steps.ModelUse("offline-rules-v1", 1, 300, 120, Decimal("0.0021"))
    call = ToolRun(f"{env_mid.workflow_id}:{env_mid.seq}:9", 9, "refund", "started", {"o": 1})
    existing_key = await conn.fetchval("SELECT idempotency_key FROM tool_runs LIMIT 1")

    async def start_and_finish(c: Conn) -> None:
        await tool_runs.start(c, env_mid.workflow_id, env_mid.step_id, env_mid.attempt, call, 30)
        done = ToolRun(call.key, 9, "refund", "succeeded", {"o": 1}, {"refund": "RF-1"})
        await tool_runs.finish(c, done, env_mid.attempt)

    async def consolidate_one(c: Conn) -> None:
        owner = await consolidation.tenant_of(c, given_up)
        assert owner is not None
        async with tenancy.scoped(c, owner):
            await consolidation.lock(c, given_up)
            await consolidation.mark(c, given_up)

    async def fail_retry(c: Conn) -> None:
        await steps.fail(
            c,
            env_mid,
            error="TimeoutError: model",
            retry_after=2.0,
            recorded=outcome(next_agents=(), tools=1).tool_runs,
            worker="worker-bench",
            started_at=started,
            usage=use,
        )

    async def fail_final(c: Conn) -> None:
        await steps.fail(
            c,
            env_behind,
            error="RuntimeError: boom",
            retry_after=None,
            recorded=[],
            worker="worker-bench",
            started_at=started,
            usage=use,
        )

    async def park(c: Conn, parked: Parked) -> None:
        await steps.park(
            c,
            env_mid,
            parked,
            ordinal=0,
            recorded=[],
            worker="worker-bench",
            started_at=started,
            usage=use,
        )

    return [
        Case(
            "submit (new customer)",
            lambda c: workflows.create(c, submission("tenant-7", None, "cus-new", "key-new")),
        ),
        Case(
            "submit (returning customer)",
            lambda c: workflows.create(c, submission(tenant, session, "cus-1", "key-again")),
        ),
        Case("open (SELECT_OPEN)", lambda c: open_one(c, env_mid)),
        Case(
            "complete (handoff)",
            lambda c: steps.complete(
                c, env_mid, outcome(next_agents=("response",), tools=2), opened_mid
            ),
        ),
        Case(
            "complete (final)",
            lambda c: steps.complete(
                c, env_last, outcome(next_agents=(), message=True), opened_last
            ),
        ),
        Case("take over", lambda c: steps.take_over(c, envelope_of(stalled), "worker-bench")),
        Case("fail (retry later)", fail_retry),
        Case("fail (dead letter, next in session)", fail_final),
        Case(
            "park (ask: signal + question)",
            lambda c: park(c, Parked(name="input", delay=None, question="Refund 40 EUR?")),
        ),
        Case("park (sleep 60 s)", lambda c: park(c, Parked(name=None, delay=60.0))),
        Case(
            "signal (answer a question)",
            lambda c: waits.send_signal(
                c,
                signal_wait["workflow_id"],
                "input",
                {"text": "yes"},
                transcript=("customer", "cus", "yes"),
            ),
        ),
        Case("heartbeat (16 steps)", lambda c: recovery.heartbeat(c, beat)),
        Case("reconciler: stalled", lambda c: recovery.stalled(c, older_than=STALL_AFTER)),
        Case(
            "reconciler: requeue",
            lambda c: recovery.requeue(
                c, stalled["id"], reason="stalled", seen_attempt=stalled["attempt"]
            ),
        ),
        Case("reconciler: stalled sessions", lambda c: recovery.stalled_sessions(c)),
        Case(
            "reconciler: unconsolidated",
            lambda c: consolidation.unconsolidated(
                c, older_than=5.0, limit=1000, source="consolidation", max_failures=3
            ),
        ),
        Case("consolidator: lag", lambda c: consolidation.oldest_age(c)),
        Case("consolidate one workflow", consolidate_one),
        Case("timers due", lambda c: waits.wake_due(c, limit=100)),
        Case("run_until_idle: busy", lambda c: recovery.busy(c, within=0.0)),
        Case("tool call: start + finish", start_and_finish),
        Case("tool call: fetch", lambda c: tool_runs.fetch(c, existing_key)),
        Case(
            "Client.wait (500 ids)",
            lambda c: workflows.terminal_statuses(c, sample),
        ),
        Case("Client.get (finished)", lambda c: workflows.get(c, done_id)),
        Case("watch: events after", lambda c: events.after(c, done_id, 0, 500)),
        Case("prune: one batch (500, 30 d)", lambda c: prune._prune_batch(c, 30 * 86400.0, 500)),
    ]


# --------------------------------------------------------------------------- passes


async def sizes(conn: Conn) -> set[str]:
    rows = await conn.fetch(SIZES)
    print("| table | rows | total size |\n|---|---|---|")
    for r in rows:
        print(f"| {r['relname']} | {r['rows']:,} | {r['bytes'] / 2**20:,.0f} MB |")
    return {r["relname"] for r in rows if r["rows"] > BIG}


async def run_pass(
    label: str, pool: asyncpg.Pool, server: PostgresServer, schema: str, big: set[str]
) -> Pass:
    """Record every case, EXPLAIN every statement it sent; print plans and a table."""
    names = statement_names()
    rewrites = proposals()
    result = Pass(label)
    async with pool.acquire() as conn:
        for case in await cases(conn):
            calls = await record(conn, case.op)
            for i, call in enumerate(calls):
                name = names.get(call.sql, call.sql.split()[0])
                if name == "tenancy.SET_TENANT":
                    continue
                variants = [("", name, call.sql)]
                if call.sql in rewrites:
                    variants.append(("proposed", f"{name} (proposed)", rewrites[call.sql]))
                answers = []
                for variant, shown_name, sql in variants:
                    lines, answer = await explain(conn, calls, i, sql)
                    answers.append(answer)
                    shown = [ln if len(ln) <= WIDTH else ln[:WIDTH] + " ..." for ln in lines]
                    print(f"\n=== [{label}] {case.name}: {shown_name}\n" + "\n".join(shown))
                    if variant:  # ties of an ORDER BY may come in any order: sorted
                        same = sorted(map(repr, answer)) == sorted(map(repr, answers[0]))
                        print(
                            f"result rows: {'the same' if same else 'DIFFERENT'} as the "
                            f"current statement's ({len(answer)})"
                        )
                    generic = indexes_of(nodes(generic_plan(server, schema, sql)))
                    summary = summarize(lines, big)
                    if generic != summary["indexes"]:
                        print(f"generic plan indexes: {generic}")
                    key = (case.name, i, variant)
                    result.results.append(Result(key, shown_name, summary, generic))
    print(
        f"\n[{label}]\n| operation | statement | top node | indexes (custom) | indexes (generic)"
        " | seq scans | rows | exec ms | trigger ms | buffers hit/read/dirtied |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in result.results:
        s = r.summary
        generic = "same" if r.generic == s["indexes"] else r.generic
        print(
            f"| {r.key[0]} | {r.statement} | {s['top']} | {s['indexes']} | {generic} "
            f"| {s['seq']} | {s['rows']} | {s['ms']:.3f} | {s['triggers']:.3f} | {s['detail']} |"
        )
    return result


async def counters(conn: Conn) -> dict[str, tuple[int, int, int]]:
    return {
        r["name"]: (r["scans"], r["entries"], r["seq_rows"]) for r in await conn.fetch(COUNTERS)
    }


async def submit_running(
    pool: asyncpg.Pool, n: int, tag: str, sessions: int | None = None
) -> list[TaskEnvelope]:
    """``n`` workflows submitted at once (the store's submit), each in its own session or
    over ``sessions`` sessions (the rest queue behind the first of each); the first steps
    of those that run."""
    firsts: list[TaskEnvelope] = []
    async with pool.acquire() as conn:
        for i in range(n):
            k = i if sessions is None else i % sessions
            session = None if sessions is None else f"{tag}-session-{k}"
            sub = submission(f"tenant-{k % 20}", session, f"cus-{tag}-{k}", f"{tag}-{i}")
            created = await workflows.create(conn, sub)
            if not created.queued:
                firsts.append(created.envelope)
    return firsts


async def drain(
    label: str, url: str, schema: str, owner: asyncpg.Connection, firsts: list[TaskEnvelope]
) -> list[str]:
    """Open and complete every step of the submitted workflows (triage -> research ->
    response), as a worker would, one at a time; the counters of the drain.

    Its own pool: a backend flushes its statistics when it exits, so closing the pool
    after the drain (and every earlier one before it) keeps the counters to the drain.
    """
    await anyio.sleep(1.5)  # earlier backends' statistics are flushed by now
    before = await counters(owner)
    buffers_before = await owner.fetchval(BUFFERS_IO)
    pipeline = {"triage": ("research", 0, False), "research": ("response", 2, False)}
    pipeline |= {"response": ("", 0, True)}
    took: list[float] = []
    opens: list[float] = []
    start = time.perf_counter()
    pool = await create_pool(url, schema=schema, size=1, timeout=600)
    async with pool.acquire() as conn:
        queue = list(firsts)
        while queue:
            handed: list[TaskEnvelope] = []
            for env in queue:
                began = time.perf_counter()
                opened = await open_one(conn, env)
                opens.append(time.perf_counter() - began)
                nxt, tools, final = pipeline[env.agent]
                result = outcome(next_agents=() if final else (nxt,), tools=tools, message=final)
                began = time.perf_counter()
                done = await steps.complete(conn, env, result, opened)
                took.append(time.perf_counter() - began)
                handed += done.next
            queue = handed
    wall = time.perf_counter() - start
    await pool.close()
    await anyio.sleep(1.5)
    after = await counters(owner)
    buffers = await owner.fetchval(BUFFERS_IO) - buffers_before
    n = len(took)
    p = statistics.quantiles(took, n=100)
    q = statistics.quantiles(opens, n=100)
    out = [
        f"[{label}] drain: {n // 3} workflows, {n} completions in {wall:.1f}s; "
        f"complete p50 {p[49] * 1000:.2f} ms p99 {p[98] * 1000:.2f} ms; "
        f"open p50 {q[49] * 1000:.2f} ms p99 {q[98] * 1000:.2f} ms; "
        f"buffers (all tables) {buffers:,} = {buffers / max(n, 1):.0f}/completion",
        "| counter | scans | index entries read | seq rows read | per completion |",
        "|---|---|---|---|---|",
    ]
    for name, (scans, entries, seq_rows) in sorted(after.items()):
        d = [
            a - b
            for a, b in zip((scans, entries, seq_rows), before.get(name, (0, 0, 0)), strict=True)
        ]
        if d[0] or d[1] or d[2]:
            out.append(
                f"| {name} | {d[0]:,} | {d[1]:,} | {d[2]:,} | {(d[1] + d[2]) / max(n, 1):.1f} |"
            )
    print("\n".join(out))
    return out


def compare(passes: list[Pass]) -> None:
    """Buffers of each statement across the passes, and the flags."""
    by: list[dict[tuple[str, int, str], Result]] = [{r.key: r for r in p.results} for p in passes]
    labels = [p.label for p in passes]
    print(
        "\n| operation | statement | "
        + " | ".join(f"buffers {label}" for label in labels)
        + " | flags |\n"
        + "|---" * (len(labels) + 3)
        + "|"
    )
    flagged: list[str] = []
    for key, first in by[-1].items():
        bufs = [b[key].summary["buffers"] if key in b else None for b in by]
        flags = []

        def grows(a: int | None, b: int | None) -> bool:
            return a is not None and b is not None and b >= 2 * a and b - a >= 20

        if len(bufs) > 1 and grows(bufs[0], bufs[1]):
            flags.append("grows with history")
        if any(grows(bufs[1] if len(bufs) > 1 else None, b) for b in bufs[2:]):
            flags.append("grows with live work")
        if any("(BIG)" in b[key].summary["seq"] for b in by if key in b):
            flags.append("seq scan on a big table")
        if any(b[key].generic != b[key].summary["indexes"] for b in by if key in b):
            flags.append("generic plan differs")
        cells = " | ".join("-" if v is None else str(v) for v in bufs)
        print(f"| {key[0]} | {first.statement} | {cells} | {', '.join(flags) or '-'} |")
        if flags:
            flagged.append(f"{key[0]}: {first.statement} ({', '.join(flags)})")
    print("\nFlagged:\n" + ("\n".join(f"- {f}" for f in flagged) or "none"))


async def given_up(server: PostgresServer, schema: str, owner: asyncpg.Connection) -> None:
    """The consolidation scans before and after the given-up consolidations of the fill
    (written as before migration V14) are given up as V14 does (committed: an index entry
    of a row updated in the same transaction would still be read)."""
    pool = await create_pool(server.url, schema=schema, size=1, timeout=600)
    try:
        async with pool.acquire() as conn:
            scans = [
                ("UNCONSOLIDATED", consolidation.UNCONSOLIDATED, [5.0, 1000]),
                ("OLDEST_UNCONSOLIDATED", consolidation.OLDEST_UNCONSOLIDATED, []),
            ]
            for when in ("before", "after"):
                if when == "after":
                    marked = await owner.execute(V14_GIVEN_UP_CONSOLIDATIONS)
                    await owner.execute("VACUUM workflows")
                    print(f"\ngiven-up consolidations marked: {marked}")
                for name, sql, args in scans:
                    lines, _ = await explain(conn, [Call(sql, tuple(args))], 0)
                    s = summarize(lines, set())
                    print(
                        f"\n=== [given up, {when}] {name}: {s['top']}, {s['indexes']}, "
                        f"rows {s['rows']}, {s['ms']:.3f} ms, buffers {s['detail']}\n"
                        + "\n".join(ln[:WIDTH] for ln in lines)
                    )
    finally:
        await pool.close()


async def fill_schema(
    server: PostgresServer, schema: str, workflows_n: int, live: int
) -> asyncpg.Connection:
    """A migrated schema with the history and the live work; the owner's connection."""
    owner = await asyncpg.connect(server.url, server_settings={"search_path": f"{schema},public"})
    await owner.execute(await owner.fetchval("SELECT format('CREATE SCHEMA %I', $1::text)", schema))
    await migrate(owner)
    print(f"[{schema}] filling {workflows_n:,} finished + {live} live workflows")
    timings = await history.fill(owner, workflows_n, analyze=False)
    await owner.execute("SET session_replication_role = replica")
    for sql in LIVE:
        await owner.execute(sql, *([live, TP] if "$2" in sql else [live]))
    await owner.execute("RESET session_replication_role")
    start = time.perf_counter()
    await owner.execute("VACUUM ANALYZE")
    analyzed = time.perf_counter() - start
    print(f"[{schema}] fill {timings['total']:.0f}s + VACUUM ANALYZE {analyzed:.0f}s\n")
    return owner


async def explain_pass(label: str, server: PostgresServer, schema: str, big: set[str]) -> Pass:
    pool = await create_pool(server.url, schema=schema, size=1, timeout=600)
    try:
        return await run_pass(label, pool, server, schema, big)
    finally:
        await pool.close()


async def submit(
    server: PostgresServer, schema: str, n: int, tag: str, sessions: int | None = None
) -> list[TaskEnvelope]:
    pool = await create_pool(server.url, schema=schema, size=1, timeout=600)
    try:
        return await submit_running(pool, n, tag, sessions)
    finally:
        await pool.close()


async def main(args: argparse.Namespace) -> None:
    passes: list[Pass] = []
    drains: list[list[str]] = []
    with PostgresServer(settings=SERVER) as server:
        if args.small:
            owner = await fill_schema(server, "explain_small", args.small, args.live)
            try:
                big = await sizes(owner)
                passes.append(await explain_pass("small", server, "explain_small", big))
                await owner.execute("DROP SCHEMA explain_small CASCADE")  # room for the big one
            finally:
                await owner.close()
        schema = "explain_bench"
        owner = await fill_schema(server, schema, args.workflows, args.live)
        try:
            big = await sizes(owner)
            passes.append(await explain_pass(f"{args.workflows:,}", server, schema, big))
            if args.running:
                # Submitted after the last ANALYZE: the planner has not seen them.
                firsts = await submit(server, schema, args.running, "stale")
                passes.append(await explain_pass("running, stale", server, schema, big))
                drains.append(await drain("stale stats", server.url, schema, owner, firsts))
                firsts = await submit(server, schema, args.running, "fresh")
                await owner.execute("ANALYZE")
                passes.append(await explain_pass("running, fresh", server, schema, big))
                drains.append(await drain("fresh stats", server.url, schema, owner, firsts))
                # Returning customers: 10 tickets per session, 9 of them queued behind the
                # first; statistics from before they existed.
                sessions = max(1, args.running // 10)
                firsts = await submit(server, schema, args.running, "queued", sessions)
                passes.append(await explain_pass("queued, stale", server, schema, big))
                drains.append(await drain("sessions, stale", server.url, schema, owner, firsts))
            await given_up(server, schema, owner)
        finally:
            await owner.close()
    compare(passes)
    for lines in drains:
        print("\n" + "\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=1_000_000, help="finished workflows")
    parser.add_argument("--small", type=int, default=100_000, help="the smaller history (0: none)")
    parser.add_argument("--live", type=int, default=300, help="live (running/waiting) ones")
    parser.add_argument("--running", type=int, default=2_000, help="submitted at once, drained")
    anyio.run(main, parser.parse_args())
