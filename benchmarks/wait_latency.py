"""Benchmark: one workflow at a time, as `orchestrator submit --wait` sees it.

Submits the noop pipeline's workflows one after another, each followed by
``Client.wait`` on it, with in-process workers, and prints p50/p99 of the time from
``submit`` to ``wait`` returning (what a caller waits), next to the time Postgres
records from submit commit to completion commit (what the runtime takes).

    python benchmarks/wait_latency.py --workflows 200
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import time

import anyio
from pipeline import LATENCIES, noop_app

from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.runtime import open_runtime
from orchestrator.settings import Settings

DROP = "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)"


async def bench(args: argparse.Namespace) -> None:
    suffix = secrets.token_hex(3)
    settings = Settings(key_prefix=f"bench-{suffix}", db_schema=f"bench_{suffix}", block_ms=100)
    async with open_runtime(settings, noop_app()) as runtime:
        try:
            client = Client(runtime)
            worker = Worker(runtime, concurrency=8)
            seen: list[float] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(0.3)  # let the consumer groups exist
                for i in range(args.warmup + args.workflows):
                    start = time.perf_counter()
                    wid = await client.submit(None, {"n": i})
                    await client.wait([wid], timeout=30)
                    if i >= args.warmup:
                        seen.append((time.perf_counter() - start) * 1000)
                worker.stop()
            async with runtime.db() as conn:
                recorded = [float(r["ms"]) for r in await conn.fetch(LATENCIES)]
        finally:
            async with runtime.db() as conn:
                await conn.execute("RESET ROLE")  # the owner drops the schema
                await conn.execute(await conn.fetchval(DROP, settings.db_schema))
    seen.sort()
    recorded = recorded[args.warmup :] if len(recorded) > args.warmup else recorded
    recorded.sort()
    print(
        f"workflows={len(seen)} caller_p50_ms={statistics.median(seen):.1f} "
        f"caller_p99_ms={seen[int(len(seen) * 0.99) - 1]:.1f} "
        f"runtime_p50_ms={statistics.median(recorded):.1f} "
        f"runtime_p99_ms={recorded[int(len(recorded) * 0.99) - 1]:.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    anyio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
