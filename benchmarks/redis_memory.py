"""Benchmark: Redis memory stays flat as workflows go through (no growth per workflow).

Runs the full pipeline (benchmarks/pipeline.py's three no-op agents, an in-process
Worker with its reconciler) on a private Redis and Postgres (tests/fault/servers.py)
in batches. After each batch has finished it samples ``INFO memory`` used_memory,
the connections' buffers (CLIENT LIST tot-mem), the sum of MEMORY USAGE over the
runtime's keys, DBSIZE, each agent stream's XLEN and the dead-letter stream's XLEN;
then it runs the reconciler's housekeeping (trim acknowledged entries, drop dead
consumers), as the leader does every 10 passes, and samples again.

    PYTHONPATH=. python benchmarks/redis_memory.py --workflows 20000 --batch 2000
"""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any

import anyio

from benchmarks.pipeline import noop_app
from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from tests.fault.servers import PostgresServer, RedisServer


async def sample(rt: Runtime) -> dict[str, Any]:
    info: Any = await rt.redis.info("memory")
    clients: Any = await rt.redis.client_list()
    owned = 0
    async for key in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*", count=1000):
        owned += await rt.redis.memory_usage(key, samples=0) or 0
    return {
        "used": int(info["used_memory"]),
        "connections": len(clients),
        # Per connection: query and output buffers, argv (6.2's mem_clients_normal
        # leaves the query buffers out; they show up in used_memory_dataset).
        "clients": sum(int(c.get("tot-mem", 0)) for c in clients),
        "owned": owned,
        "keys": await rt.redis.dbsize(),
        "streams": {a: await rt.redis.xlen(rt.keys.stream(a)) for a in rt.app.agents},
        "dlq": await rt.redis.xlen(rt.keys.dead_letter_stream()),
    }


def kb(value: int) -> str:
    return f"{value / 1024:,.0f}"


def row(done: int, when: str, s: dict[str, Any], wps: float | str) -> str:
    xlen = " / ".join(str(v) for v in s["streams"].values())
    rate = f"{wps:.0f}" if isinstance(wps, float) else wps
    return (
        f"| {done:,} | {when} | {kb(s['used'])} | {s['connections']} | {kb(s['clients'])} "
        f"| {kb(s['used'] - s['clients'])} | {kb(s['owned'])} | {s['keys']} | {xlen} "
        f"| {s['dlq']} | {rate} |"
    )


async def main(args: argparse.Namespace) -> None:
    app = noop_app()
    with RedisServer() as redis, PostgresServer() as pg:
        suffix = secrets.token_hex(3)
        settings = Settings(
            REDIS_URL=redis.url,
            DATABASE_URL=pg.url,
            OPENAI_API_KEY="",
            key_prefix=f"mem-{suffix}",
            db_schema=f"mem_{suffix}",
            pool_size=20,
            block_ms=100,
        )
        async with open_runtime(settings, app) as rt:
            client = Client(rt)
            worker = Worker(rt, concurrency=args.concurrency)
            housekeeping = Reconciler(rt, worker.consumer).housekeeping
            rows: list[str] = []
            samples: list[dict[str, Any]] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(0.5)
                rows.append(row(0, "start", await sample(rt), "-"))
                limiter = anyio.CapacityLimiter(args.submitters)
                done = 0
                while done < args.workflows:
                    size = min(args.batch, args.workflows - done)
                    ids: list[Any] = []

                    async def submit(i: int, ids: list[Any] = ids) -> None:
                        async with limiter:
                            ticket = Ticket(customer_id=f"c{i}", subject="memory", body="noop")
                            ids.append(await client.submit("noop", ticket))

                    start = time.perf_counter()
                    async with anyio.create_task_group() as submitters:
                        for i in range(done, done + size):
                            submitters.start_soon(submit, i)
                    statuses = await client.wait(ids, timeout=600)
                    wps = size / (time.perf_counter() - start)
                    assert all(s.value == "completed" for s in statuses.values()), statuses
                    done += size
                    rows.append(row(done, "batch done", await sample(rt), wps))
                    await housekeeping()
                    after = await sample(rt)
                    samples.append(after)
                    rows.append(row(done, "housekept", after, ""))
                worker.stop()
            async with rt.pool.acquire() as conn:
                await conn.execute(f'DROP SCHEMA "{settings.db_schema}" CASCADE')
    print(
        f"workflows={args.workflows} batch={args.batch} concurrency={args.concurrency} "
        f"(3 no-op steps each; streams: {', '.join(app.agents)})\n"
    )
    print(
        "| workflows done | sample | used_memory KiB | connections | client buffers KiB "
        "| used_memory - client buffers KiB | keys' MEMORY USAGE KiB | keys | XLEN per stream "
        "| XLEN dead-letter | workflows/s |\n" + "|---" * 11 + "|"
    )
    print("\n".join(rows))
    first, last = samples[0], samples[-1]
    between = args.workflows - min(args.batch, args.workflows)
    print()
    for label, key in (("used_memory", "used"), ("keys' MEMORY USAGE", "owned")):
        values = [s[key] for s in samples]
        per = (last[key] - first[key]) / between if between else 0.0
        print(
            f"after housekeeping, {label}: first batch {kb(first[key])} KiB, last "
            f"{kb(last[key])} KiB, min {kb(min(values))} max {kb(max(values))} KiB; "
            f"{per:+.2f} bytes per workflow over the last {between:,}"
        )
    net = [s["used"] - s["clients"] for s in samples]
    print(f"used_memory - client buffers: min {kb(min(net))} max {kb(max(net))} KiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=32, help="steps in flight per agent")
    parser.add_argument("--submitters", type=int, default=16)
    anyio.run(main, parser.parse_args())
