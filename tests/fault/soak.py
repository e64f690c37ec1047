"""Soak: every fault at random against a fleet, then the fault suite's table (outside CI).

    python -m tests.fault.soak --workflows 10000 --minutes 10 [--workers 3] [--seed 7]

Private Redis, Postgres and tool server, as in the fault suite; a mix of
pipelines (idempotent effects, payments without and with a reconcile check,
a failing agent) runs while, every few seconds, one fault is picked at random:
SIGKILL a worker, SIGSTOP one past its liveness TTL, FLUSHALL, restart Redis
empty, restart Postgres, stop Postgres or Redis for seconds, black-hole both
through proxies. The same invariants as the suite are checked at the end and
the exit code is non-zero when any is broken.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio

from orchestrator.runtime import Runtime
from tests.fault.conftest import pytest_terminal_summary
from tests.fault.harness import ROWS, Fleet, run_scenario
from tests.fault.proxy import BlackholeProxy
from tests.fault.servers import PostgresServer, RedisServer
from tests.fault.toolserver import run_toolserver

OPEN = "SELECT count(*) FROM workflows WHERE status IN ('queued', 'running', 'waiting')"
MIX = {"three": 0.55, "pay": 0.15, "checked_pay": 0.2, "poison": 0.1}


class Soak:
    def __init__(
        self,
        redis: RedisServer,
        pg: PostgresServer,
        proxies: tuple[BlackholeProxy, BlackholeProxy],
        *,
        minutes: float,
        seed: int,
    ) -> None:
        self.redis, self.pg, self.proxies = redis, pg, proxies
        self.until = time.monotonic() + minutes * 60
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()

    async def disturb(self, rt: Runtime, fleet: Fleet) -> int:
        """Inject faults until every workflow is terminal or the time is up."""
        faults = {
            "sigkill": self._sigkill,
            "sigstop": self._sigstop,
            "flushall": self._flushall,
            "redis restart": self._redis_restart,
            "redis down": self._redis_down,
            "postgres restart": self._pg_restart,
            "postgres down": self._pg_down,
            "black hole": self._black_hole,
        }
        while time.monotonic() < self.until:
            fleet.keep_alive()
            if await self._open(rt) == 0:
                break
            name = self.rng.choice(list(faults))
            self.injected[name] += 1
            print(f"soak: {name}", file=sys.stderr, flush=True)
            await faults[name](fleet)
            await self._quiet(fleet, self.rng.uniform(2, 6))
        return sum(self.injected.values())

    async def _open(self, rt: Runtime) -> int:
        try:
            async with rt.pool.acquire() as conn:
                return int(await conn.fetchval(OPEN))
        except Exception:
            return -1  # our own Postgres may be down: not done

    async def _quiet(self, fleet: Fleet, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            fleet.keep_alive()
            await anyio.sleep(0.2)

    async def _sigkill(self, fleet: Fleet) -> None:
        live = [p for p in fleet.procs if p.poll() is None]
        if live:
            fleet.kill(self.rng.choice(live))

    async def _sigstop(self, fleet: Fleet) -> None:
        live = [p for p in fleet.procs if p.poll() is None]
        if live:
            proc = self.rng.choice(live)
            os.kill(proc.pid, signal.SIGSTOP)
            await self._quiet(fleet, self.rng.uniform(3, 8))
            os.kill(proc.pid, signal.SIGCONT)

    async def _flushall(self, fleet: Fleet) -> None:
        self.redis.flush()

    async def _redis_restart(self, fleet: Fleet) -> None:
        await anyio.to_thread.run_sync(self.redis.restart)

    async def _redis_down(self, fleet: Fleet) -> None:
        await anyio.to_thread.run_sync(self.redis.stop)
        await self._quiet(fleet, self.rng.uniform(2, 10))
        await anyio.to_thread.run_sync(self.redis.start)

    async def _pg_restart(self, fleet: Fleet) -> None:
        await anyio.to_thread.run_sync(self.pg.restart)

    async def _pg_down(self, fleet: Fleet) -> None:
        await anyio.to_thread.run_sync(self.pg.stop)
        await self._quiet(fleet, self.rng.uniform(2, 10))
        await anyio.to_thread.run_sync(self.pg.start)

    async def _black_hole(self, fleet: Fleet) -> None:
        for proxy in self.proxies:
            proxy.blackhole()
        await self._quiet(fleet, self.rng.uniform(2, 8))
        for proxy in self.proxies:
            proxy.heal()


def _split(total: int) -> dict[str, int]:
    counts = {name: int(total * share) for name, share in MIX.items()}
    counts["three"] += total - sum(counts.values())
    return counts


async def soak(workflows: int, minutes: float, workers: int, seed: int) -> bool:
    with (
        tempfile.TemporaryDirectory(prefix="orch-soak-") as tmp,
        RedisServer() as redis,
        PostgresServer() as pg,
        run_toolserver(Path(tmp)) as tool_url,
        BlackholeProxy(*_host_port(redis.url)) as redis_proxy,
        BlackholeProxy(*_host_port(pg.url)) as pg_proxy,
    ):
        runner = Soak(redis, pg, (redis_proxy, pg_proxy), minutes=minutes, seed=seed)
        logs = Path(tempfile.mkdtemp(prefix="orch-soak-logs-"))  # kept for reading afterwards
        row, facts = await run_scenario(
            f"soak seed {seed}",
            redis=redis,
            pg=pg,
            tool_url=tool_url,
            logs=logs,
            pipelines=_split(workflows),
            extra_env={"FAULT_STEP_SECONDS": "0.02"},
            workers=workers,
            disturb=runner.disturb,
            timeout=minutes * 60 + 300,
            worker_urls=(redis_proxy.url_for(redis.url), pg_proxy.url_for(pg.url)),
        )
        ROWS.append(row)
        print(f"faults injected: {dict(runner.injected)}", file=sys.stderr)
        broken = _broken(row, facts)
        _print_table()
        for problem in broken:
            print(f"BROKEN: {problem}", file=sys.stderr)
        print(f"worker logs: {logs}", file=sys.stderr)
        return not broken


def _broken(row: Any, facts: dict[str, Any]) -> list[str]:
    checks = {
        f"{row.lost} workflow(s) not terminal": row.lost == 0,
        f"{row.duplicate_effects} duplicate effect(s)": row.duplicate_effects == 0,
        f"{facts['steps_completed_twice']} step(s) completed twice": (
            facts["steps_completed_twice"] == 0
        ),
        f"unexpected worker exits: {facts['unexpected_exits']}": row.unexpected_exits == 0,
        f"attempts beyond failures: {row.excess_attempts} > faults {row.faults}": (
            row.excess_attempts <= row.faults
        ),
        f"recorded calls without one effect: {facts['recorded_keys_without_effect'][:5]}": (
            not facts["recorded_keys_without_effect"]
        ),
    }
    return [problem for problem, ok in checks.items() if not ok]


def _host_port(url: str) -> tuple[str, int]:
    rest = url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[2]
    host, _, port = rest.rpartition(":")
    return host, int(port)


class _Reporter:
    def __init__(self) -> None:
        self.section = lambda title: print(f"\n== {title} ==")
        self.write_line = print


def _print_table() -> None:
    pytest_terminal_summary(_Reporter())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--workflows", type=int, default=10_000)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    ok = anyio.run(soak, args.workflows, args.minutes, args.workers, args.seed)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
