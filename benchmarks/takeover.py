"""Benchmark: how fast the steps of a SIGKILLed worker restart elsewhere, with default settings.

Per round, on a private Redis and Postgres (tests/fault/servers.py), with every
setting at its default (lease 30 s, worker TTL 3 s, stall 60 s):

1. worker A (a ``python -m orchestrator.cli worker`` subprocess) runs ``--victims``
   long steps (``--victim-sleep`` s each; benchmarks/takeover_app.py), all at once;
2. worker B starts and runs ``--survivors`` steps of ``--survivor-sleep`` s (longer
   than the lease and the stall time by default), and has room for A's steps;
3. A is SIGKILLed; the kill time is read from Postgres (``clock_timestamp()``).

Printed per round and over all rounds: seconds from the kill to each of A's steps
being taken over (its ``step.taken_over`` event: the new fence) and to its new
execution starting (``step_attempts.started_at`` of the next attempt), p50/p99/max;
the liveness TTL A still had left at the kill (the floor of the takeover time); and
whether any of B's live steps was taken over or re-queued (its attempt must stay 1).

    PYTHONPATH=. python benchmarks/takeover.py --rounds 3 --victims 16 --survivors 4
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio

from benchmarks.takeover_app import app
from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.coordination.locks import owner_of
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from tests.fault.servers import PostgresServer, RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = "benchmarks.takeover_app:app"

TAKEN_OVER = """
SELECT extract(epoch FROM e.created_at - $2) AS s, e.data->>'by' AS by
FROM events e WHERE e.type = 'step.taken_over' AND e.workflow_id = ANY($1::uuid[])
"""
RESTARTED = """
SELECT extract(epoch FROM min(a.started_at) - $2) AS s
FROM steps s JOIN step_attempts a ON a.step_id = s.id AND a.attempt > 1
WHERE s.workflow_id = ANY($1::uuid[]) GROUP BY s.id
"""
STEPS = "SELECT attempt, status FROM steps WHERE workflow_id = ANY($1::uuid[])"
MOVED = """
SELECT count(*) FROM events
WHERE workflow_id = ANY($1::uuid[]) AND type IN ('step.taken_over', 'step.requeued')
"""


@dataclass
class Round:
    taken_over: list[float]  # seconds from the kill, one per victim step
    restarted: list[float]
    ttl_left: float  # A's liveness key TTL at the kill
    victim_attempts: list[int]
    victims_completed: int
    survivor_attempts: list[int]
    survivors_completed: int
    survivor_moves: int  # taken_over/requeued events on the survivor's steps
    takers: set[str]


def spawn(env: dict[str, str], log: Path, concurrency: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "orchestrator", "--app", APP, "worker"]
    with log.open("wb") as out:
        return subprocess.Popen(
            [*cmd, "--concurrency", str(concurrency)],
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        await anyio.sleep(0.05)
    return result


async def consumer_of(rt: Runtime, proc: subprocess.Popen[bytes]) -> str:
    """The worker's consumer name, once its liveness key exists (hostname-pid-hex)."""

    async def alive() -> str | None:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {proc.pid} exited {proc.returncode}")
        pattern = rt.keys.worker_alive(f"{socket.gethostname()}-{proc.pid}-*")
        async for key in rt.redis.scan_iter(match=pattern):
            return str(key.decode()).rpartition(":alive:")[2]
        return None

    name: str = await until("worker start", alive, 60)
    return name


async def running_on(rt: Runtime, ids: list[UUID], consumer: str) -> bool:
    """Whether every workflow's first step is leased (running) by ``consumer``."""
    held = await rt.redis.mget([rt.keys.step_lock(i, 0) for i in ids])
    return all(h is not None and owner_of(h) == consumer for h in held)


async def submit(client: Client, count: int, seconds: float) -> list[UUID]:
    return [
        await client.submit(
            None, Ticket(customer_id=f"c{i}", subject="takeover", body=str(seconds))
        )
        for i in range(count)
    ]


async def one_round(urls: tuple[str, str], logs: Path, args: argparse.Namespace, n: int) -> Round:
    suffix = secrets.token_hex(3)
    settings = Settings(
        REDIS_URL=urls[0],
        DATABASE_URL=urls[1],
        OPENAI_API_KEY="",
        key_prefix=f"takeover-{suffix}",
        db_schema=f"takeover_{suffix}",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(
        REDIS_URL=urls[0],
        DATABASE_URL=urls[1],
        OPENAI_API_KEY="",
        ORCHESTRATOR_KEY_PREFIX=settings.key_prefix,
        ORCHESTRATOR_DB_SCHEMA=settings.db_schema,
        ORCHESTRATOR_LOG_LEVEL="INFO",
        PYTHONPATH=str(REPO_ROOT),
    )
    procs: list[subprocess.Popen[bytes]] = []
    async with open_runtime(settings, app) as rt:
        try:
            client = Client(rt)
            victim = spawn(env, logs / f"round{n}-victim.log", args.victims)
            procs.append(victim)
            a = await consumer_of(rt, victim)
            victims = await submit(client, args.victims, args.victim_sleep)
            await until("victim running", lambda: running_on(rt, victims, a), 30)

            slots = args.victims + args.survivors
            survivor = spawn(env, logs / f"round{n}-survivor.log", slots)
            procs.append(survivor)
            b = await consumer_of(rt, survivor)
            survivors = await submit(client, args.survivors, args.survivor_sleep)
            await until("survivor running", lambda: running_on(rt, survivors, b), 30)

            async with rt.pool.acquire() as conn:
                ttl_ms = await rt.redis.pttl(rt.keys.worker_alive(a))
                victim.kill()
                killed_at = await conn.fetchval("SELECT clock_timestamp()")
            victim.wait()

            async def all_taken() -> bool:
                async with rt.pool.acquire() as conn:
                    return len(await conn.fetch(TAKEN_OVER, victims, killed_at)) >= len(victims)

            await until("takeover", all_taken, 120)
            timeout = max(args.victim_sleep, args.survivor_sleep) + 120
            await client.wait(victims + survivors, timeout=timeout)
            async with rt.pool.acquire() as conn:
                taken = await conn.fetch(TAKEN_OVER, victims, killed_at)
                restarted = [float(r["s"]) for r in await conn.fetch(RESTARTED, victims, killed_at)]
                victim_steps = await conn.fetch(STEPS, victims)
                survivor_steps = await conn.fetch(STEPS, survivors)
                moves = await conn.fetchval(MOVED, survivors)
            return Round(
                taken_over=sorted(float(r["s"]) for r in taken),
                restarted=sorted(restarted),
                ttl_left=ttl_ms / 1000,
                victim_attempts=[r["attempt"] for r in victim_steps],
                victims_completed=sum(r["status"] == "completed" for r in victim_steps),
                survivor_attempts=[r["attempt"] for r in survivor_steps],
                survivors_completed=sum(r["status"] == "completed" for r in survivor_steps),
                survivor_moves=moves,
                takers={str(r["by"]) for r in taken},
            )
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            async with rt.pool.acquire() as conn:
                await conn.execute(f'DROP SCHEMA "{settings.db_schema}" CASCADE')


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def stats(values: list[float]) -> str:
    if not values:
        return "- | - | -"
    return f"{statistics.median(values):.2f} | {pct(values, 0.99):.2f} | {max(values):.2f}"


def row(label: str, rounds: list[Round]) -> str:
    took = [t for r in rounds for t in r.taken_over]
    restarted = [t for r in rounds for t in r.restarted]
    ttl = [r.ttl_left for r in rounds]
    victims = sorted({a for r in rounds for a in r.victim_attempts})
    survivors = sorted({a for r in rounds for a in r.survivor_attempts})
    done = sum(r.victims_completed + r.survivors_completed for r in rounds)
    moved = sum(r.survivor_moves for r in rounds)
    return (
        f"| {label} | {len(took)} | {stats(took)} | {stats(restarted)} | "
        f"{min(ttl):.2f}-{max(ttl):.2f} | {victims} | {survivors} | {moved} | {done} |"
    )


async def main(args: argparse.Namespace) -> None:
    rounds: list[Round] = []
    with (
        tempfile.TemporaryDirectory(prefix="takeover-") as tmp,
        RedisServer() as redis,
        PostgresServer() as pg,
    ):
        for n in range(1, args.rounds + 1):
            rounds.append(await one_round((redis.url, pg.url), Path(tmp), args, n))
            print(f"round {n} done", file=sys.stderr, flush=True)
    print(
        f"victims={args.victims} x {args.victim_sleep:g}s, survivors={args.survivors} x "
        f"{args.survivor_sleep:g}s; defaults: lease 30s, worker TTL 3s, stall 60s\n"
    )
    print(
        "| round | steps taken over | taken over p50 | p99 | max | restarted p50 | p99 | max "
        "| TTL left at kill | victim attempts | survivor attempts | survivor steps moved "
        "| completed |"
    )
    print("|---" * 13 + "|")
    for i, r in enumerate(rounds, 1):
        print(row(str(i), [r]))
    print(row("all", rounds))
    live = sum(r.survivor_moves for r in rounds) + sum(
        a != 1 for r in rounds for a in r.survivor_attempts
    )
    print(f"\nlive long steps on the surviving worker taken over or re-run: {live}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--victims", type=int, default=16, help="steps running on the killed one")
    parser.add_argument("--survivors", type=int, default=4, help="steps on the surviving worker")
    parser.add_argument("--victim-sleep", type=float, default=20.0)
    parser.add_argument(
        "--survivor-sleep", type=float, default=65.0, help="past the lease and the stall time"
    )
    anyio.run(main, parser.parse_args())
