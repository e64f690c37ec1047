"""Self-check of the fault harness: tool server counting, private Redis and Postgres."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import asyncpg
import pytest
import redis

from tests.fault.servers import PostgresServer, RedisServer, free_port
from tests.fault.toolserver import (
    REPO_ROOT,
    applied_count,
    post_effect,
    reset,
    run_toolserver,
    stats,
)

SHARED_PORTS = {6379, 5432}


@pytest.mark.fault
@pytest.mark.anyio
async def test_toolserver_dedupes_idempotent_and_counts_plain(tmp_path: Path) -> None:
    with run_toolserver(tmp_path) as url:
        results: list[dict[str, object]] = []

        async def call(i: int) -> None:
            results.append(await post_effect(url, "wf-1:0:0", "idempotent", {"i": i}))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(call, i)
        assert len(results) == 10
        assert sum(bool(r["applied"]) for r in results) == 1
        assert len({r["effect_id"] for r in results}) == 1
        assert await applied_count(url, "wf-1:0:0") == 1

        plain = [await post_effect(url, "wf-2:0:0", "plain", None) for _ in range(3)]
        assert all(r["applied"] for r in plain)
        assert len({r["effect_id"] for r in plain}) == 3
        assert await applied_count(url, "wf-2:0:0") == 3
        assert await applied_count(url, "never/called key") == 0

        snapshot = stats(url)
        assert snapshot["calls"] == 13
        assert snapshot["effects"] == 4
        assert snapshot["by_key"] == {"wf-1:0:0": 1, "wf-2:0:0": 3}
        assert snapshot["calls_by_key"] == {"wf-1:0:0": 10, "wf-2:0:0": 3}

        with pytest.raises(RuntimeError, match="HTTP 400"):
            await post_effect(url, "k", "bogus", None)

        reset(url)
        assert stats(url) == {"calls": 0, "effects": 0, "by_key": {}, "calls_by_key": {}}


@pytest.mark.fault
def test_toolserver_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    ready = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fault.toolserver", "--port", "0", "--ready-file", str(ready)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        port = int(ready.read_text())
        assert port not in SHARED_PORTS
        assert stats(f"http://127.0.0.1:{port}")["calls"] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.fault
def test_redis_restart_comes_back_empty_on_same_port(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis") as server:
        port = server.port
        assert port not in SHARED_PORTS
        assert server.url == f"redis://127.0.0.1:{port}/0"
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        assert server.dbsize() == 1

        server.restart()
        assert server.port == port and server.running
        assert server.dbsize() == 0

        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        server.kill()
        assert not server.running
        with pytest.raises(redis.ConnectionError), redis.Redis.from_url(server.url) as client:
            client.ping()
        server.start()
        assert server.dbsize() == 0

        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        server.flush()
        assert server.dbsize() == 0
    assert not server.running


@pytest.mark.fault
@pytest.mark.anyio
async def test_postgres_restart_and_kill_keep_data_with_pgvector() -> None:
    async def query(url: str, sql: str) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql)
            return rows
        finally:
            await conn.close()

    with PostgresServer() as server:
        assert server.port not in SHARED_PORTS
        assert server.url == f"postgresql://postgres@127.0.0.1:{server.port}/postgres"
        conn = await asyncpg.connect(server.url)
        try:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            await conn.execute("CREATE TABLE items (id int PRIMARY KEY, emb vector(3))")
            await conn.execute("INSERT INTO items VALUES (1, '[1,2,3]')")
        finally:
            await conn.close()

        port = server.port
        server.restart()
        assert server.port == port and server.running
        rows = await query(server.url, "SELECT id, emb::text AS emb FROM items")
        assert [(r["id"], r["emb"]) for r in rows] == [(1, "[1,2,3]")]

        await query(server.url, "INSERT INTO items VALUES (2, '[0,0,1]')")
        server.kill()
        assert not server.running
        server.start()  # crash recovery
        rows = await query(server.url, "SELECT id FROM items ORDER BY emb <-> '[0,0,1]' LIMIT 1")
        assert [r["id"] for r in rows] == [2]
        assert server.psql("SELECT count(*) FROM items").strip() == "2"
    assert not server.running
    assert not server.directory.exists()


@pytest.mark.fault
def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 1024 <= port <= 65535 and port not in SHARED_PORTS
