"""Runs worker subprocesses against private servers and measures the invariants."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import asyncpg

from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.store import workflows
from tests.fault import toolserver
from tests.fault.app import app as fault_app
from tests.fault.servers import PostgresServer, RedisServer
from tests.fault.toolserver import REPO_ROOT

FAST = {
    "ORCHESTRATOR_LEASE_SECONDS": "1",
    "ORCHESTRATOR_STALL_SECONDS": "2",
    "ORCHESTRATOR_RECONCILE_INTERVAL_SECONDS": "0.5",
    "ORCHESTRATOR_RETRY_BASE_SECONDS": "0.05",
    "ORCHESTRATOR_RETRY_CAP_SECONDS": "0.2",
    "ORCHESTRATOR_BLOCK_MS": "100",
    "ORCHESTRATOR_SHUTDOWN_GRACE_SECONDS": "2",
    "ORCHESTRATOR_WORKER_TTL_SECONDS": "2",
    "ORCHESTRATOR_TOOL_TIMEOUT_SECONDS": "2",
    "ORCHESTRATOR_PG_TIMEOUT_SECONDS": "3",
    "ORCHESTRATOR_REDIS_TIMEOUT_SECONDS": "2",
}


@dataclass
class Row:
    """One line of the fault suite's table."""

    scenario: str
    workflows: int
    completed: int
    dead_lettered: int
    duplicate_effects: int
    lost: int
    seconds: float
    crashes: int = 0
    unfinished_at_disturbance: int | None = None
    unexpected_exits: int = 0  # worker exits the scenario did not cause
    faults: int = 0  # faults injected: crashes, disturbances, pauses
    excess_attempts: int = 0  # max over steps of (attempt - 1 - real failures)


class Fleet:
    """Worker subprocesses; a dead one is replaced, with the crash point while crashes last.

    Every exit the scenario did not cause (anything but a SIGKILL from a configured
    crash point, or a clean exit after ``stop``) is counted in ``unexpected``.
    """

    def __init__(self, env: dict[str, str], logs: Path, *, size: int, crashes: int) -> None:
        self.env = env
        self.logs = logs
        self.size = size
        self.crashes_left = crashes
        self.crashes = 0
        self.unexpected: list[tuple[int, int | None]] = []  # (worker number, exit code)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._crashing: set[int] = set()  # pids started with a crash point
        self._number: dict[int, int] = {}
        self._n = 0
        self.stuck: list[int] = []  # workers that ignored SIGTERM at the end (then SIGKILLed)
        self.exit_logs: dict[int, str] = {}  # the end of each unexpectedly exited worker's log

    def spawn(self, extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {**self.env, **(extra or {})}
        if self.crashes_left <= 0:
            env.pop("ORCHESTRATOR_CRASH_AT", None)
        self._n += 1
        log = (self.logs / f"worker-{self._n}.log").open("wb")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--app",
                "tests.fault.app:app",
                "worker",
                "--concurrency",
                env.get("FAULT_CONCURRENCY", "8"),
            ],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if "ORCHESTRATOR_CRASH_AT" in env:
            self._crashing.add(proc.pid)
        self._number[proc.pid] = self._n
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn()

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker on purpose: counted as a crash, not as an unexpected exit."""
        self._crashing.add(proc.pid)
        proc.kill()

    def keep_alive(self, *, respawn: bool = True) -> None:
        for proc in list(self.procs):
            code = proc.poll()
            if code is None:
                continue
            self.procs.remove(proc)
            if code == -signal.SIGKILL and proc.pid in self._crashing:
                self.crashes += 1
                self.crashes_left -= 1
            else:
                self._unexpected(proc, code)
            if respawn:
                self.spawn()

    def stop(self) -> None:
        self.keep_alive(respawn=False)
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in self.procs:
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
                self.stuck.append(self._number[proc.pid])
            # SIGTERM kills a worker still starting (before its handlers): that is ours too.
            if code not in (0, -signal.SIGTERM):
                self._unexpected(proc, code)
        self.procs.clear()

    def _unexpected(self, proc: subprocess.Popen[bytes], code: int | None) -> None:
        """Count an exit the scenario did not cause, keeping the end of its log for the report."""
        number = self._number[proc.pid]
        self.unexpected.append((number, code))
        log = self.logs / f"worker-{number}.log"
        tail = log.read_text(errors="replace").splitlines()[-25:] if log.exists() else []
        self.exit_logs[number] = "\n".join(tail)


def scenario_settings(redis: RedisServer, pg: PostgresServer) -> Settings:
    suffix = secrets.token_hex(3)
    return Settings(
        REDIS_URL=redis.url,
        DATABASE_URL=pg.url,
        OPENAI_API_KEY="",
        key_prefix=f"fault-{suffix}",
        db_schema=f"fault_{suffix}",
    )


def worker_env(
    settings: Settings,
    tool_url: str,
    extra: dict[str, str],
    *,
    redis_url: str | None = None,
    database_url: str | None = None,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(FAST)
    env.update(
        {
            "REDIS_URL": redis_url or settings.redis_url or "",
            "DATABASE_URL": database_url or settings.database_url or "",
            "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
            "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
            "ORCHESTRATOR_LOG_LEVEL": "INFO",
            "FAULT_TOOLSERVER_URL": tool_url,
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    env.update(extra)
    return env


ROWS: list[Row] = []  # every scenario of the session, printed by conftest at the end

# A disturbance returns how many faults it injected (None: one).
Disturb = Callable[[Runtime, Fleet], Awaitable[int | None]]
# Run after the measurement, on the scenario's open runtime and workflow ids; what it
# returns is in the facts under "inspected" (for a test's own queries and checks).
Inspect = Callable[[Runtime, list[UUID]], Awaitable[Any]]


async def run_scenario(
    name: str,
    *,
    redis: RedisServer,
    pg: PostgresServer,
    tool_url: str,
    logs: Path,
    pipelines: dict[str, int],
    extra_env: dict[str, str] | None = None,
    workers: int = 2,
    crashes: int = 0,
    disturb: Disturb | None = None,
    timeout: float = 120.0,
    worker_urls: tuple[str, str] | None = None,
    excess_query: str | None = None,
    inspect: Inspect | None = None,
) -> tuple[Row, dict[str, Any]]:
    """Submit the workflows, run the fleet (and the disturbance), then measure.

    ``worker_urls``: (Redis, Postgres) URLs for the workers only (through a proxy).
    ``excess_query``: how excess attempts are measured (default ``MEASURE_EXCESS``;
    ``MEASURE_EXCESS_PARKED`` for steps that sleep or wait). ``inspect``: see ``Inspect``.
    """
    settings = scenario_settings(redis, pg)
    toolserver.reset(tool_url)
    logs.mkdir(parents=True, exist_ok=True)
    env = worker_env(
        settings,
        tool_url,
        extra_env or {},
        redis_url=worker_urls[0] if worker_urls else None,
        database_url=worker_urls[1] if worker_urls else None,
    )
    fleet = Fleet(env, logs, size=workers, crashes=crashes)
    faults = [0]
    start = time.monotonic()
    async with open_runtime(settings, fault_app) as rt:
        client = Client(rt)
        ids: list[UUID] = []
        for pipeline, count in pipelines.items():
            for i in range(count):
                ticket = Ticket(tenant_id="t", customer_id=f"c{i}", subject=name, body=pipeline)
                ids.append(await client.submit(pipeline, ticket))
        fleet.start()
        try:
            unfinished = await _drive(rt, fleet, ids, disturb, start + timeout, faults)
        finally:
            fleet.stop()
        seconds = time.monotonic() - start
        facts = await _measure(rt, ids, tool_url, excess_query or MEASURE_EXCESS)
        if inspect is not None:
            facts["inspected"] = await inspect(rt, ids)
    row = Row(
        name,
        len(ids),
        facts["completed"],
        facts["dead_lettered"],
        facts["duplicate_effects"],
        facts["lost"],
        round(seconds, 1),
        fleet.crashes,
        unfinished,
        len(fleet.unexpected),
        fleet.crashes + faults[0],
        facts["excess_attempts"],
    )
    facts["unexpected_exits"] = fleet.unexpected
    facts["stuck_at_stop"] = fleet.stuck
    facts["exit_logs"] = fleet.exit_logs
    return row, facts


async def _drive(
    rt: Runtime,
    fleet: Fleet,
    ids: list[UUID],
    disturb: Disturb | None,
    deadline: float,
    faults: list[int],
) -> int | None:
    """Keep the fleet alive until every workflow is terminal; disturb once, early.

    Returns how many workflows were unfinished when the disturbance hit.
    """
    disturbed = disturb is None
    unfinished = None
    while time.monotonic() < deadline:
        fleet.keep_alive()
        try:
            async with rt.pool.acquire() as conn:
                done = await workflows.terminal_statuses(conn, ids)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await anyio.sleep(0.3)  # our own Postgres may be restarting
            continue
        if len(done) == len(ids):
            return unfinished
        if not disturbed and len(done) >= 1:
            disturbed, unfinished = True, len(ids) - len(done)
            assert disturb is not None
            injected = await disturb(rt, fleet)
            faults[0] += 1 if injected is None else injected
        await anyio.sleep(0.05)
    return unfinished


MEASURE_STEPS = """
SELECT count(*) FILTER (WHERE n > 1) AS twice
FROM (SELECT step_id, count(*) AS n FROM step_attempts WHERE outcome = 'completed'
      GROUP BY step_id) x
"""
MEASURE_WORKFLOWS = """
SELECT w.id, w.status, (SELECT count(*) FROM dead_letters d WHERE d.workflow_id = w.id) AS dl,
       (SELECT string_agg(d.reason, ' | ') FROM dead_letters d WHERE d.workflow_id = w.id)
           AS reasons
FROM workflows w WHERE w.id = ANY($1::uuid[])
"""
# Attempts beyond real failures: each is a takeover or requeue, which only a fault may cause.
# A step's own attempts: one per real failure, plus the one that completed it; a step
# that failed for good ends on its last failure (the dead letter moves no fence).
OWN_ATTEMPTS = "(s.failures + CASE WHEN s.status = 'failed' THEN 0 ELSE 1 END)"
MEASURE_EXCESS = f"""
SELECT coalesce(max(greatest(s.attempt - {OWN_ATTEMPTS}, 0)), 0)
FROM steps s WHERE s.workflow_id = ANY($1::uuid[])
"""
# The steps behind an excess (at most 3), with their events: what took or requeued them.
EXCESS_HISTORY = f"""
SELECT s.workflow_id, s.seq, s.agent, s.status, s.attempt, s.failures,
       (SELECT string_agg(e.type || ' ' || e.data::text || ' @' || e.created_at::time::text,
                          E'\\n    ' ORDER BY e.id)
        FROM events e WHERE e.step_id = s.id) AS history
FROM steps s WHERE s.workflow_id = ANY($1::uuid[]) AND s.attempt > {OWN_ATTEMPTS}
ORDER BY s.attempt - s.failures DESC, s.workflow_id LIMIT 3
"""
# As MEASURE_EXCESS, for steps that park (sleep, wait for a signal): each park is
# followed by one wake-up (timer, signal, or a signal already there), which raises the
# fence once without any fault; a park is an attempt row with outcome 'waiting'.
MEASURE_EXCESS_PARKED = f"""
SELECT coalesce(max(greatest(s.attempt - {OWN_ATTEMPTS}
                             - (SELECT count(*) FROM step_attempts a
                                WHERE a.step_id = s.id AND a.outcome = 'waiting'), 0)), 0)
FROM steps s WHERE s.workflow_id = ANY($1::uuid[])
"""
MEASURE_EFFECT_KEYS = """
SELECT t.idempotency_key, t.tool FROM tool_runs t JOIN steps s ON s.id = t.step_id
WHERE t.workflow_id = ANY($1::uuid[]) AND s.status = 'completed'
"""


async def _measure(
    rt: Runtime, ids: list[UUID], tool_url: str, excess_query: str = MEASURE_EXCESS
) -> dict[str, Any]:
    for _ in range(50):
        try:
            async with rt.pool.acquire() as conn:
                rows = await conn.fetch(MEASURE_WORKFLOWS, ids)
                twice = await conn.fetchval(MEASURE_STEPS)
                keys = await conn.fetch(MEASURE_EFFECT_KEYS, ids)
                excess = await conn.fetchval(excess_query, ids)
                history = await conn.fetch(EXCESS_HISTORY, ids) if excess else []
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await anyio.sleep(0.2)
    stats = toolserver.stats(tool_url)
    ours = {k: v for k, v in stats["by_key"].items() if k.split(":")[0] in {str(i) for i in ids}}
    completed = sum(r["status"] == WorkflowStatus.COMPLETED for r in rows)
    dead = sum(r["status"] == WorkflowStatus.FAILED and r["dl"] > 0 for r in rows)
    return {
        "completed": completed,
        "dead_lettered": dead,
        "lost": len(ids) - completed - dead,
        "duplicate_effects": sum(max(0, n - 1) for n in ours.values()),
        "steps_completed_twice": twice,
        "excess_attempts": excess,
        "excess_history": "\n".join(
            f"  workflow {r['workflow_id']} step {r['seq']} ({r['agent']}, {r['status']}): "
            f"attempt {r['attempt']}, failures {r['failures']}\n    {r['history']}"
            for r in history
        ),
        "recorded_keys_without_effect": [
            k["idempotency_key"] for k in keys if ours.get(k["idempotency_key"], 0) != 1
        ],
        "reasons": [r["reasons"] for r in rows if r["reasons"]],
        "calls": sum(
            v
            for k, v in stats.get("calls_by_key", {}).items()
            if k.split(":")[0] in {str(i) for i in ids}
        ),
    }


@contextlib.contextmanager
def cpu_hog(processes: int = 2) -> Iterator[None]:
    """Busy loops competing for every core while a scenario runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


async def scenario(servers: dict[str, Any], name: str, **kwargs: Any) -> dict[str, Any]:
    row, facts = await run_scenario(
        name,
        redis=servers["redis"],
        pg=servers["pg"],
        tool_url=servers["tool_url"],
        logs=servers["logs"] / name,
        **kwargs,
    )
    ROWS.append(row)
    assert row.lost == 0, f"{name}: {row.lost} workflow(s) lost; logs in {servers['logs']}"
    assert row.unexpected_exits == 0, (
        f"{name}: workers exited (logs in {servers['logs']}): {facts['unexpected_exits']} "
        f"(ignored SIGTERM at the end: "
        f"{facts['stuck_at_stop']}); their logs end:\n"
        + "\n---\n".join(f"worker-{n}:\n{tail}" for n, tail in facts["exit_logs"].items())
    )
    assert row.excess_attempts <= row.faults, (
        f"{name}: a step ran {row.excess_attempts} attempt(s) beyond its failures with only "
        f"{row.faults} fault(s) injected; logs in {servers['logs']}:\n{facts['excess_history']}"
    )
    assert facts["steps_completed_twice"] == 0
    assert row.duplicate_effects == 0
    assert facts["recorded_keys_without_effect"] == []
    return {"row": row, **facts}
