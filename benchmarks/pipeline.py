"""Benchmark: N tickets through triage → research → response with the offline model.

Prints workflows/s, p50/p99 end-to-end latency (Postgres timestamps: submit
commit to final completion commit) and Postgres transactions per workflow:
``pg_writes`` counts committed writing transactions exactly (transaction ids
assigned), ``pg_xacts`` every transaction including autocommit reads and the
benchmark's own status polls (pg_stat_database.xact_commit).

    python benchmarks/pipeline.py --tickets 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time
from typing import Any

import anyio

from orchestrator.agents.support import app as support_app
from orchestrator.agents.support import sample_tickets
from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext


class Echo(AgentOutput):
    ok: bool


def noop_app() -> App:
    """Three agents that do nothing: measures the runtime's own per-step cost."""
    app = App("noop")
    for name in ("first", "second", "third"):

        class Noop(Agent[AgentInput, Echo]):
            input_model = AgentInput
            output_model = Echo

            async def run(self, ctx: StepContext, data: AgentInput) -> Echo:
                return Echo(ok=True)

        app.agent(type(f"Noop_{name}", (Noop,), {"name": name}))
    app.pipeline("noop", ["first", "second", "third"], input_key="ticket")
    return app


LATENCIES = """
SELECT extract(epoch FROM completed_at - created_at) * 1000 AS ms
FROM workflows WHERE status = 'completed' ORDER BY ms
"""
COMMITS = "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
# Only writing transactions get a transaction id: the delta counts write commits exactly.
XID = "SELECT txid_current()"
DROP = "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)"


async def commits(runtime: Runtime) -> int:
    async with runtime.pool.acquire() as conn:
        # pg_stat counters are cached per transaction; clear for a fresh read.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value: int = await conn.fetchval(COMMITS)
        return value


async def xid(runtime: Runtime) -> int:
    async with runtime.pool.acquire() as conn:
        value: int = await conn.fetchval(XID)
        return value


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    suffix = secrets.token_hex(3)
    settings = Settings(
        key_prefix=f"bench-{suffix}", db_schema=f"bench_{suffix}", pool_size=args.pool, block_ms=100
    )
    samples = sample_tickets()
    tickets = [samples[i % len(samples)] for i in range(args.tickets)]
    app = support_app if args.app == "support" else noop_app()
    async with open_runtime(settings, app) as runtime:
        try:
            client = Client(runtime)
            worker = Worker(runtime, concurrency=args.concurrency)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(0.2)  # let the consumer groups exist
                before, xid_before = await commits(runtime), await xid(runtime)
                start = time.perf_counter()
                limiter = anyio.CapacityLimiter(args.submitters)
                ids: list[Any] = []

                async def submit(ticket: Any) -> None:
                    async with limiter:
                        ids.append(await client.submit(None, ticket))

                async with anyio.create_task_group() as submitters:
                    for i, ticket in enumerate(tickets):
                        if args.rate:
                            # Open loop at a fixed offered load: latency without a backlog.
                            await anyio.sleep(max(0.0, start + i / args.rate - time.perf_counter()))
                        submitters.start_soon(submit, ticket)
                statuses = await client.wait(ids, timeout=600)
                seconds = time.perf_counter() - start
                after, xid_after = await commits(runtime), await xid(runtime)
                worker.stop()
            async with runtime.pool.acquire() as conn:
                latencies = [float(r["ms"]) for r in await conn.fetch(LATENCIES)]
        finally:
            async with runtime.pool.acquire() as conn:
                await conn.execute("RESET ROLE")  # the owner drops the schema
                await conn.execute(await conn.fetchval(DROP, settings.db_schema))
    completed = sum(s.value == "completed" for s in statuses.values())
    return {
        "tickets": len(tickets),
        "completed": completed,
        "concurrency": args.concurrency,
        "rate": args.rate,
        "seconds": seconds,
        "workflows_per_s": completed / seconds,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "commits_per_workflow": (after - before) / len(tickets),
        "writes_per_workflow": (xid_after - xid_before - 1) / len(tickets),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickets", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32, help="steps in flight per agent")
    parser.add_argument("--submitters", type=int, default=16, help="concurrent submits")
    parser.add_argument("--pool", type=int, default=20, help="Postgres pool size")
    parser.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="submit at this many tickets/s (default: all at once)",
    )
    parser.add_argument(
        "--app",
        choices=["support", "noop"],
        default="support",
        help="the support agents, or three no-op agents (runtime cost only)",
    )
    args = parser.parse_args()
    result = anyio.run(bench, args)
    print(
        f"app={args.app} tickets={result['tickets']} "
        f"completed={result['completed']} "
        f"concurrency={result['concurrency']} rate={result['rate'] or 'all-at-once'} "
        f"wall={result['seconds']:.2f}s "
        f"workflows/s={result['workflows_per_s']:.1f} p50={result['p50_ms']:.1f}ms "
        f"p99={result['p99_ms']:.1f}ms pg_writes/workflow={result['writes_per_workflow']:.2f} "
        f"pg_xacts/workflow={result['commits_per_workflow']:.2f}"
    )


if __name__ == "__main__":
    main()
