"""Benchmark: what one session costs in Redis (working memory) and in Postgres.

Runs one long session through the real engine (an in-process Worker, the offline
path): ``--turns`` transcript messages, as tickets of one customer message and one
agent reply each; every step reads working memory (``ctx.memory.transcript()``),
calls a tool and says one line. Then prints:

* Redis bytes per active session: ``MEMORY USAGE`` of the session's working-memory
  key (and its length), against ``working_memory_max_bytes``;
* Postgres bytes per session of that many turns: the growth of ``messages`` and
  ``events`` (``pg_total_relation_size``: heap, TOAST and indexes), the session's own
  rows (``pg_column_size``), and every table of the schema together.

Private embedded servers in a temporary directory unless REDIS_URL / DATABASE_URL
are set; a schema and key prefix of its own, removed afterwards.

    PYTHONPATH=. python benchmarks/memory_sizes.py --turns 500
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext

TENANT, SESSION, CUSTOMER = "bench-tenant", "bench-session", "bench-customer"
SENTENCE = (
    "My router keeps dropping the connection every evening around eight and the "
    "lights on the front go amber before it restarts by itself. "
)
TABLES = """
SELECT c.relname AS name, pg_total_relation_size(c.oid) AS bytes
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind = 'r'
"""
SESSION_ROWS = """
SELECT (SELECT count(*) FROM messages WHERE session_id = $1) AS messages,
       (SELECT coalesce(sum(pg_column_size(m.*)), 0) FROM messages m
        WHERE m.session_id = $1) AS message_bytes,
       (SELECT count(*) FROM events e JOIN workflows w ON w.id = e.workflow_id
        WHERE w.session_id = $1) AS events,
       (SELECT coalesce(sum(pg_column_size(e.*)), 0) FROM events e
        JOIN workflows w ON w.id = e.workflow_id WHERE w.session_id = $1) AS event_bytes
"""
DROP = "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)"
RESET_ROLE = "RESET ROLE"
SET_TENANT = "SELECT set_config('orchestrator.tenant', $1, false)"


class Turn(BaseModel):
    """One customer message."""

    text: str


class TurnIn(AgentInput):
    input: Turn


class Reply(AgentOutput):
    ok: bool


def build_app() -> App:
    """One agent that reads working memory, calls a tool and replies."""
    app = App("memory-sizes", version="bench")

    @app.tool
    async def account(text: str) -> dict[str, Any]:
        """A ~1.5 KB account record."""
        return {"plan": "fibre 500", "history": [SENTENCE[:90]] * 15, "asked": text[:40]}

    @app.agent
    class Helper(Agent[TurnIn, Reply]):
        name = "helper"
        input_model = TurnIn
        output_model = Reply
        tools = ("account",)

        async def run(self, ctx: StepContext, data: TurnIn) -> Reply:
            earlier = await ctx.memory.transcript(limit=20)
            await ctx.tool("account", text=data.input.text)
            ctx.say(
                f"Thanks, I have looked at your account ({len(earlier)} earlier lines). "
                + SENTENCE * 2
            )
            return Reply(ok=True)

    app.pipeline("turn", ["helper"], input_model=Turn)
    return app


async def table_sizes(rt: Runtime) -> dict[str, int]:
    async with rt.pool.acquire() as conn:
        return {r["name"]: int(r["bytes"]) for r in await conn.fetch(TABLES)}


async def bench(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    suffix = secrets.token_hex(3)
    settings = Settings(
        key_prefix=f"bench-{suffix}", db_schema=f"bench_{suffix}", home=home, block_ms=50
    )
    tickets = args.turns // 2
    async with open_runtime(settings, build_app()) as rt:
        try:
            before = await table_sizes(rt)
            client = Client(rt)
            start = time.perf_counter()
            for i in range(tickets):
                text = f"({i}) " + SENTENCE * 2
                await client.submit(
                    "turn", Turn(text=text), tenant=TENANT, session=SESSION, customer=CUSTOMER
                )
            await Worker(rt, concurrency=1).run_until_idle(timeout=600)
            seconds = time.perf_counter() - start
            after = await table_sizes(rt)
            key = rt.keys.working_memory(TENANT, SESSION)
            usage = await rt.redis.memory_usage(key, samples=0) or 0
            length = await rt.redis.strlen(key)
            async with rt.pool.acquire() as conn, conn.transaction():
                await conn.execute(SET_TENANT, TENANT)  # messages are tenant rows
                rows = await conn.fetchrow(SESSION_ROWS, SESSION)
        finally:
            async with rt.pool.acquire() as conn:
                await conn.execute(RESET_ROLE)  # the owner drops the schema
                await conn.execute(await conn.fetchval(DROP, settings.db_schema))
            stale = [k async for k in rt.redis.scan_iter(match=f"{settings.key_prefix}:*")]
            if stale:
                await rt.redis.delete(*stale)
    grown = {name: after[name] - before.get(name, 0) for name in after}
    return {
        "tickets": tickets,
        "seconds": seconds,
        "cap": settings.working_memory_max_bytes,
        "redis_usage": usage,
        "redis_strlen": length,
        "messages": rows["messages"],
        "message_rows": rows["message_bytes"],
        "events": rows["events"],
        "event_rows": rows["event_bytes"],
        "messages_table": grown.get("messages", 0),
        "events_table": grown.get("events", 0),
        "all_tables": sum(grown.values()),
        "by_table": grown,
    }


def report(r: dict[str, Any]) -> None:
    kb = 1024
    print(
        f"one session: {r['messages']} messages over {r['tickets']} tickets in {r['seconds']:.1f} s"
    )
    print()
    print("| measure | bytes | KB |")
    print("|---|---:|---:|")
    rows = [
        ("Redis: MEMORY USAGE of the working-memory key", r["redis_usage"]),
        ("Redis: its value (STRLEN)", r["redis_strlen"]),
        ("Redis: cap (working_memory_max_bytes)", r["cap"]),
        (f"Postgres: {r['messages']} message rows (pg_column_size)", r["message_rows"]),
        ("Postgres: messages table growth (heap+TOAST+indexes)", r["messages_table"]),
        (f"Postgres: {r['events']} event rows (pg_column_size)", r["event_rows"]),
        ("Postgres: events table growth (heap+TOAST+indexes)", r["events_table"]),
        ("Postgres: every table's growth (the whole session)", r["all_tables"]),
    ]
    for label, value in rows:
        print(f"| {label} | {value:,} | {value / kb:,.1f} |")
    print()
    print("growth by table (KB): " + ", ".join(
        f"{name} {value / kb:,.0f}" for name, value in sorted(r["by_table"].items()) if value
    ))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=500, help="transcript messages")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orch-bench-") as home:
        report(anyio.run(bench, args, Path(home)))


if __name__ == "__main__":
    main()
