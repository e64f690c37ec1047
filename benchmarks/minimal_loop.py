"""Reference floor: a bare redis-py + asyncpg loop, one commit per step, no runtime.

Three stages pass each workflow along Redis Streams (XREADGROUP, XADD + XACK)
and commit one row update per step. It has none of the runtime's guarantees
(no fence, no ledger, no checkpoints); it shows what this machine allows, so
``pipeline.py`` figures can be read against it.

    python benchmarks/minimal_loop.py --workflows 2000 --concurrency 32
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import statistics
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import anyio
import asyncpg
import redis.asyncio as aioredis

from orchestrator.embedded import embedded_postgres, embedded_redis
from orchestrator.settings import Settings

STAGES = ("a", "b", "c")
DDL = """
CREATE TABLE bench_wf (
    id bigint PRIMARY KEY, stage int NOT NULL, created timestamptz NOT NULL DEFAULT now(),
    done timestamptz
)
"""


async def stage(
    r: aioredis.Redis, pool: asyncpg.Pool, prefix: str, i: int, conc: int, stop: anyio.Event
) -> None:
    stream, nxt = (
        f"{prefix}:{STAGES[i]}",
        (f"{prefix}:{STAGES[i + 1]}" if i + 1 < len(STAGES) else None),
    )
    sem = anyio.Semaphore(conc)

    async def handle(entry_id: bytes, wid: int) -> None:
        try:
            async with pool.acquire() as conn:
                await conn.execute(
                    "UPDATE bench_wf SET stage = $2, done = CASE WHEN $3 THEN now() END "
                    "WHERE id = $1",
                    wid,
                    i + 1,
                    nxt is None,
                )
            pipe = r.pipeline(transaction=False)
            if nxt:
                pipe.xadd(nxt, {b"w": str(wid)})
            pipe.xack(stream, "g", entry_id)
            await pipe.execute()
        finally:
            sem.release()

    async with anyio.create_task_group() as tg:
        while not stop.is_set():
            await sem.acquire()
            reply = await r.xreadgroup("g", "c", {stream: ">"}, count=1 + sem.value, block=100)
            entries = [e for _, es in reply or [] for e in es]
            if not entries:
                sem.release()
                continue
            for _ in entries[1:]:
                await sem.acquire()
            for entry_id, fields in entries:
                tg.start_soon(handle, entry_id, int(fields[b"w"]))


async def main(args: argparse.Namespace) -> None:
    settings = Settings()
    prefix = f"minimal-{secrets.token_hex(3)}"
    with TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        redis_url = settings.redis_url or stack.enter_context(embedded_redis(Path(tmp) / "r"))
        db_url = settings.database_url or stack.enter_context(
            embedded_postgres(settings.home / "pg")
        )
        r = aioredis.Redis.from_url(redis_url, max_connections=256)
        pool = await asyncpg.create_pool(db_url, min_size=4, max_size=args.pool)
        await pool.execute("DROP TABLE IF EXISTS bench_wf")
        await pool.execute(DDL)
        for s in STAGES:
            await r.xgroup_create(f"{prefix}:{s}", "g", id="0", mkstream=True)
        stop = anyio.Event()
        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(len(STAGES)):
                tg.start_soon(stage, r, pool, prefix, i, args.concurrency, stop)
            limiter = anyio.Semaphore(args.submitters)

            async def submit(wid: int) -> None:
                async with limiter:
                    await pool.execute("INSERT INTO bench_wf (id, stage) VALUES ($1, 0)", wid)
                    await r.xadd(f"{prefix}:a", {b"w": str(wid)})

            async with anyio.create_task_group() as subs:
                for wid in range(args.workflows):
                    subs.start_soon(submit, wid)
            while await pool.fetchval("SELECT count(*) FROM bench_wf WHERE done IS NULL"):
                await anyio.sleep(0.05)
            seconds = time.perf_counter() - start
            stop.set()
        lat = sorted(
            float(row[0])
            for row in await pool.fetch(
                "SELECT extract(epoch FROM done - created) * 1000 FROM bench_wf"
            )
        )
        await pool.execute("DROP TABLE bench_wf")
        await r.delete(*[f"{prefix}:{s}" for s in STAGES])
        await pool.close()
        await r.aclose()
    print(
        f"minimal loop: workflows={args.workflows} wall={seconds:.2f}s "
        f"workflows/s={args.workflows / seconds:.1f} p50={statistics.median(lat):.1f}ms "
        f"p99={lat[int(len(lat) * 0.99)]:.1f}ms commits/workflow=4"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--submitters", type=int, default=16)
    parser.add_argument("--pool", type=int, default=20)
    anyio.run(main, parser.parse_args())
