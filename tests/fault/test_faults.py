"""The fault suite: real worker processes, SIGKILL, lost Redis, restarted Postgres.

Every scenario checks the invariants by querying Postgres and the counting
tool server: every workflow reaches a terminal state (none lost), no step
completes twice, every recorded tool call has exactly one effect, and a
non-idempotent call left in doubt is dead-lettered, never repeated.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.coordination.locks import Lock
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.schemas import WorkflowStatus
from tests.fault.app import app as fault_app
from tests.fault.harness import ROWS, Fleet, Row, scenario, scenario_settings, worker_env

pytestmark = [pytest.mark.fault, pytest.mark.anyio, pytest.mark.timeout(300)]

# Steps take a moment, so a disturbance lands while many of them are in flight.
SLOW_STEPS = {"FAULT_STEP_SECONDS": "0.2"}


@pytest.mark.parametrize(
    "point", ["after_claim", "after_tool_effect", "after_commit", "after_xadd"]
)
async def test_sigkill_at_each_crash_point(servers: dict[str, Any], point: str) -> None:
    result = await scenario(
        servers,
        f"SIGKILL {point}",
        pipelines={"three": 16, "pay": 8},
        extra_env={"ORCHESTRATOR_CRASH_AT": point, "ORCHESTRATOR_CRASH_AFTER": "4"},
        crashes=6,
    )
    row: Row = result["row"]
    assert row.crashes >= 3, "the crash point was not reached often enough to test anything"
    # A payment (not idempotent) cut off mid-call by the kill, in this step or in another
    # step of the same process, is in doubt: it is dead-lettered, never repeated. Every
    # workflow of idempotent tools completes.
    assert all("in doubt" in reason for reason in result["reasons"]), result["reasons"]
    assert row.dead_lettered <= 8 and row.completed + row.dead_lettered == row.workflows


async def test_in_doubt_payment_without_a_check_is_dead_lettered(servers: dict[str, Any]) -> None:
    result = await scenario(
        servers,
        "SIGKILL after_tool_effect (payments)",
        pipelines={"pay_only": 16},
        extra_env={"ORCHESTRATOR_CRASH_AT": "after_tool_effect", "ORCHESTRATOR_CRASH_AFTER": "3"},
        crashes=3,
    )
    row: Row = result["row"]
    assert row.dead_lettered >= 1, "no payment was cut off mid-call"
    assert all("in doubt" in reason for reason in result["reasons"]), result["reasons"]
    assert row.completed + row.dead_lettered == row.workflows


async def test_in_doubt_payment_with_a_reconcile_check_completes(servers: dict[str, Any]) -> None:
    result = await scenario(
        servers,
        "SIGKILL after_tool_effect (reconcile)",
        pipelines={"checked_pay": 16},
        extra_env={"ORCHESTRATOR_CRASH_AT": "after_tool_effect", "ORCHESTRATOR_CRASH_AFTER": "3"},
        crashes=5,
    )
    assert result["row"].completed == result["row"].workflows


async def test_redis_flushall_mid_run(servers: dict[str, Any]) -> None:
    async def flush(rt: Runtime, fleet: Fleet) -> int | None:
        servers["redis"].flush()

    result = await scenario(
        servers, "Redis FLUSHALL", pipelines={"three": 60}, disturb=flush, extra_env=SLOW_STEPS
    )
    assert result["row"].completed == 60


async def test_redis_restarted_empty_mid_run(servers: dict[str, Any]) -> None:
    async def restart(rt: Runtime, fleet: Fleet) -> int | None:
        await anyio.to_thread.run_sync(servers["redis"].restart)

    result = await scenario(
        servers,
        "Redis restart (empty)",
        pipelines={"three": 60},
        disturb=restart,
        extra_env=SLOW_STEPS,
    )
    assert result["row"].completed == 60


async def test_postgres_restarted_mid_run(servers: dict[str, Any]) -> None:
    async def restart(rt: Runtime, fleet: Fleet) -> int | None:
        await anyio.to_thread.run_sync(servers["pg"].restart)

    result = await scenario(
        servers, "Postgres restart", pipelines={"three": 60}, disturb=restart, extra_env=SLOW_STEPS
    )
    assert result["row"].completed == 60


async def test_agent_that_always_raises_is_dead_lettered(servers: dict[str, Any]) -> None:
    result = await scenario(servers, "agent always raises", pipelines={"poison": 3, "three": 12})
    row: Row = result["row"]
    assert row.dead_lettered == 3 and row.completed == 12
    assert all("this agent always fails" in reason for reason in result["reasons"])


async def test_paused_worker_is_fenced_out(servers: dict[str, Any], tmp_path: Path) -> None:
    """SIGSTOP a worker mid-step past its lease; another completes; SIGCONT: rejected."""
    # One slow workflow, one worker to take it, then that worker is paused.
    settings = scenario_settings(servers["redis"], servers["pg"])
    env = worker_env(settings, servers["tool_url"], {"FAULT_SLOW_SECONDS": "3"})
    fleet = Fleet(env, tmp_path, size=0, crashes=0)
    start = time.monotonic()
    async with open_runtime(settings, fault_app) as rt:
        first = fleet.spawn()
        wid = await Client(rt).submit(
            "slow", Ticket(tenant_id="t", customer_id="c", subject="s", body="b")
        )
        await _wait_running(rt, "slow")
        os.kill(first.pid, signal.SIGSTOP)
        second = fleet.spawn()
        statuses = await Client(rt).wait([wid], timeout=60)
        assert statuses[wid] is WorkflowStatus.COMPLETED
        # The other worker's lock on the step, if any, must survive the paused one waking up.
        lock = Lock(rt.redis, rt.keys.step_lock(wid, 0), 60_000)
        assert await lock.acquire()
        os.kill(first.pid, signal.SIGCONT)
        await anyio.sleep(4)  # the paused worker finishes its sleep and tries to complete
        assert await rt.redis.get(lock.name) == lock.token.encode()
        await lock.release()
        async with rt.pool.acquire() as conn:
            attempts = await conn.fetch("SELECT attempt, outcome FROM step_attempts")
        fleet.stop()
        assert second.pid != first.pid
    log = (tmp_path / "worker-1.log").read_text()
    # Told it was superseded (the heartbeat found its lock taken), or refused at its write.
    assert "superseded" in log or "rejected" in log, log[-2000:]
    assert [a["outcome"] for a in attempts] == ["completed"]
    ROWS.append(Row("SIGSTOP past lease", 1, 1, 0, 0, 0, round(time.monotonic() - start, 1)))


async def _wait_running(rt: Runtime, agent: str) -> None:
    with anyio.fail_after(20):
        while True:
            async for key in rt.redis.scan_iter(match=f"{rt.keys.prefix}:agent:{agent}:*"):
                if await rt.redis.hget(key, "status") == b"running":
                    return
            await anyio.sleep(0.1)
