"""Benchmark: round trips and commands per workflow on the hot path, counted.

Runs the noop pipeline (three steps) with workers in this process, first one
workflow at a time, then N at once, and counts per workflow:

* Redis: round trips (each request written: a command or a whole pipeline) and
  commands (``INFO commandstats`` on the server, by command);
* Postgres: round trips (each statement or pipelined batch sent: asyncpg's
  execute paths) and statements (a batch counts each statement in it), and write
  transactions (transaction ids assigned).

It counts what the whole process sends (client and workers), background loops
included (heartbeats, reconciler, the status hash), so figures for a short run are
an upper bound of the steps' own.

    python benchmarks/round_trips.py --workflows 1000
"""

from __future__ import annotations

import argparse
import secrets
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import redis.asyncio.connection as redis_connection
from pipeline import noop_app

from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings

DROP = "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)"
XID = "SELECT txid_current()"

counts: Counter[str] = Counter()


def count_calls(owner: Any, name: str, key: str, size: Callable[..., int]) -> None:
    """Wrap ``owner.name`` so that each call adds 1 to ``key`` round trips and ``size(*args)``
    to ``key`` statements or commands."""
    original = getattr(owner, name)

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts[f"{key} round trips"] += 1
        counts[f"{key} statements"] += size(*args, **kwargs)
        return await original(self, *args, **kwargs)

    setattr(owner, name, counted)


def instrument() -> None:
    # One write per request: a single command or a whole pipeline (redis-py packs both).
    count_calls(
        redis_connection.AbstractConnection, "send_packed_command", "redis", lambda *a, **k: 0
    )
    conn = asyncpg.connection.Connection
    count_calls(conn, "_execute", "pg", lambda *a, **k: 1)  # fetch, fetchrow, fetchval, execute
    count_calls(conn, "_executemany", "pg", lambda query, args, *a, **k: len(list(args)))


async def snapshot(rt: Runtime) -> tuple[Counter[str], int, Counter[str]]:
    stats: dict[str, Any] = await rt.redis.info("commandstats")
    commands = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()})
    async with rt.db() as conn:
        xid: int = await conn.fetchval(XID)
    return Counter(counts), xid, commands


def report(label: str, n: int, before: Any, after: Any) -> None:
    mine = after[0] - before[0]
    server = after[2] - before[2]
    for key in ("info",):  # our own snapshot's command
        server.pop(key, None)
    print(f"{label}: {n} workflows")
    for key in ("redis round trips", "pg round trips", "pg statements"):
        print(f"  {key}/workflow = {mine[key] / n:.2f}")
    print(f"  redis commands/workflow = {sum(server.values()) / n:.2f}")
    top = ", ".join(f"{k} {v / n:.2f}" for k, v in server.most_common(12))
    print(f"    by command: {top}")
    print(f"  pg write transactions/workflow = {(after[1] - before[1] - 1) / n:.2f}")


async def bench(args: argparse.Namespace) -> None:
    instrument()
    suffix = secrets.token_hex(3)
    settings = Settings(
        key_prefix=f"bench-{suffix}", db_schema=f"bench_{suffix}", pool_size=20, block_ms=100
    )
    async with open_runtime(settings, noop_app()) as rt:
        try:
            client = Client(rt)
            worker = Worker(rt, concurrency=32)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(0.3)
                for i in range(20):  # warm-up
                    await client.wait([await client.submit(None, {"n": i})], timeout=30)
                before = await snapshot(rt)
                for i in range(args.one_at_a_time):
                    await client.wait([await client.submit(None, {"n": i})], timeout=30)
                after = await snapshot(rt)
                report("one at a time", args.one_at_a_time, before, after)
                before = await snapshot(rt)
                limiter = anyio.CapacityLimiter(16)
                ids: list[Any] = []

                async def submit(i: int) -> None:
                    async with limiter:
                        ids.append(await client.submit(None, {"n": i}))

                async with anyio.create_task_group() as submitters:
                    for i in range(args.workflows):
                        submitters.start_soon(submit, i)
                await client.wait(ids, timeout=600)
                after = await snapshot(rt)
                report("all at once", args.workflows, before, after)
                worker.stop()
        finally:
            async with rt.db() as conn:
                await conn.execute("RESET ROLE")  # the owner drops the schema
                await conn.execute(await conn.fetchval(DROP, settings.db_schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=1000, help="submitted at once")
    parser.add_argument("--one-at-a-time", type=int, default=100)
    anyio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
