"""``orchestrator agents``: live workers, in-flight steps, lag and pending entries per
consumer group, and the reconciler's leader, read from a real Redis while real workers run."""

from __future__ import annotations

import functools
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
import pytest

from orchestrator.client import Client
from orchestrator.coordination import overview, status, streams
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from tests.apps import TICKET, Probe, build_app
from tests.conftest import runtime_for
from tests.test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(probe)) as runtime:
        yield runtime


async def cli(rt: Runtime, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI on the runtime's Redis and key prefix, in a thread (the workers of the
    test keep running meanwhile). Postgres is left out: the command must not need it."""
    assert rt.settings.redis_url
    env = {
        "REDIS_URL": rt.settings.redis_url,
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        "ORCHESTRATOR_KEY_PREFIX": rt.settings.key_prefix,
        "COLUMNS": "200",  # a wide table: no id folded over two lines
    }
    return await anyio.to_thread.run_sync(functools.partial(run_cli, *args, env=env))


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


async def test_agents_shows_workers_steps_queues_and_the_leader(rt: Runtime, probe: Probe) -> None:
    alpha = Worker(
        rt, agents=["gated", "flaky"], concurrency=1, consumer="w-alpha", consolidate=True
    )
    beta = Worker(rt, agents=["gated"], concurrency=1, consumer="w-beta", reconcile=False)
    client = Client(rt)
    async with anyio.create_task_group() as tg:
        tg.start_soon(alpha.run)
        tg.start_soon(beta.run)
        ids = [await client.submit("gated", TICKET, session=f"s{i}") for i in range(4)]
        # Each worker runs one step (one slot each), two wait undelivered; wait until
        # the status hashes say so and the reconciler has a leader.
        with anyio.fail_after(20):
            while True:
                seen = await overview.overview(rt.redis, rt.keys)
                if sum(len(w.in_flight) for w in seen.workers) == 2 and seen.reconciler:
                    break
                await anyio.sleep(0.05)

        result = await cli(rt, "agents", "--json")
        text = await cli(rt, "agents")

        probe.gate.set()
        await client.wait(ids, timeout=20)
        alpha.stop()
        beta.stop()

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    workers = by_name(data["workers"])
    assert sorted(workers) == ["w-alpha", "w-beta"]
    assert workers["w-alpha"]["agents"] == ["gated", "flaky"]
    assert workers["w-beta"]["agents"] == ["gated"]
    assert workers["w-alpha"]["reconciler_leader"] and not workers["w-beta"]["reconciler_leader"]
    running = [s for w in workers.values() for s in w["in_flight"]]
    assert len(workers["w-alpha"]["in_flight"]) == len(workers["w-beta"]["in_flight"]) == 1
    assert {s["workflow_id"] for s in running} <= {str(i) for i in ids}
    assert {(s["agent"], s["seq"], s["attempt"]) for s in running} == {("gated", 0, 1)}

    agents = by_name(data["agents"])
    # Every agent of the app has its stream (the reconciler made them); two are served.
    assert sorted(agents) == ["chooser", "flaky", "gated", "refunder", "refuses"]
    assert {n for n, a in agents.items() if a["workers"]} == {"flaky", "gated"}
    gated = agents["gated"]
    assert gated["workers"] == ["w-alpha", "w-beta"] and gated["in_flight"] == 2
    assert gated["group"]["lag"] == 2 and gated["group"]["pending"] == 2
    holders = by_name(gated["group"]["consumers"])
    assert {n: (c["pending"], c["alive"]) for n, c in holders.items()} == {
        "w-alpha": (1, True),
        "w-beta": (1, True),
    }
    flaky = agents["flaky"]
    assert flaky["workers"] == ["w-alpha"] and flaky["in_flight"] == 0
    assert (flaky["group"]["lag"], flaky["group"]["pending"]) == (0, 0)
    assert data["consolidation"]["name"] == "consolidation"
    assert (data["consolidation"]["lag"], data["consolidation"]["pending"]) == (0, 0)
    assert data["reconciler"]["leader"] == "w-alpha" and data["reconciler"]["alive"]

    assert text.returncode == 0, text.stderr
    assert "w-alpha" in text.stdout and "w-beta" in text.stdout
    assert "2 live worker(s)" in text.stdout
    assert "reconciler leader: w-alpha (alive" in text.stdout


async def test_agents_after_the_workers_stopped(rt: Runtime, probe: Probe) -> None:
    probe.gate.set()
    worker = Worker(rt, agents=["gated"], consumer="w-once", reconcile=False)
    await Client(rt).submit("gated", TICKET)
    await worker.run_until_idle(timeout=20)

    result = await cli(rt, "agents", "--json")
    text = await cli(rt, "agents")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["workers"] == []
    [gated] = data["agents"]
    assert gated["name"] == "gated" and gated["workers"] == []
    assert (gated["group"]["lag"], gated["group"]["pending"]) == (0, 0)
    assert data["reconciler"] == {"leader": None, "alive": False, "ttl_ms": None}
    assert text.returncode == 0, text.stderr
    assert "no live workers" in text.stdout


async def test_entries_held_by_a_dead_worker_show_as_pending(rt: Runtime) -> None:
    await Client(rt).submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    # Delivered to a consumer that never had a liveness key: a worker that died.
    taken = await streams.read(rt.redis, rt.keys, "gated", "w-gone", count=1, block_ms=1000)
    assert len(taken) == 1

    result = await cli(rt, "agents", "--json")
    text = await cli(rt, "agents")

    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["workers"] == []
    group = by_name(data["agents"])["gated"]["group"]
    assert (group["lag"], group["pending"]) == (0, 1)
    [holder] = group["consumers"]
    assert (holder["name"], holder["pending"], holder["alive"]) == ("w-gone", 1, False)
    assert "w-gone: 1" in text.stdout  # held by a dead worker


def test_no_live_workers(cli_env: dict[str, str]) -> None:
    """Nothing ever ran on this key prefix (nor was Postgres migrated: not needed)."""
    text = run_cli("agents", env=cli_env)
    assert text.returncode == 0, text.stderr
    assert "no live workers" in text.stdout
    result = run_cli("agents", "--json", env=cli_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "workers": [],
        "agents": [],
        "consolidation": None,
        "reconciler": {"leader": None, "alive": False, "ttl_ms": None},
    }


def test_redis_down_is_one_line_and_exit_1(cli_env: dict[str, str]) -> None:
    result = run_cli("agents", env={**cli_env, "REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 1
    assert_one_line_error(result, "Redis unavailable")


async def test_workers_whose_status_expired_leave_the_set(rt: Runtime) -> None:
    worker = Worker(rt, consumer="w-short", reconcile=False)
    await worker._report_status()
    assert [w.name for w in await status.live_workers(rt.redis, rt.keys)] == ["w-short"]
    assert await status.drop_gone_workers(rt.redis, rt.keys) == 0
    await rt.redis.delete(rt.keys.worker_status("w-short"))  # as its TTL would
    assert await status.live_workers(rt.redis, rt.keys) == []
    assert await status.drop_gone_workers(rt.redis, rt.keys) == 1
    assert await rt.redis.smembers(rt.keys.workers()) == set()


def test_without_redis_url_says_to_set_it(cli_env: dict[str, str]) -> None:
    """An embedded Redis would be private to this command: no worker could be in it."""
    env = {k: v for k, v in cli_env.items() if k != "REDIS_URL"}
    assert_one_line_error(run_cli("agents", env=env), "set REDIS_URL")
