"""Self-check of the fault harness: tool server, black-hole proxy, private Redis and Postgres."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
import redis

from tests.fault.proxy import BlackholeProxy
from tests.fault.servers import PostgresServer, RedisServer, free_port
from tests.fault.toolserver import (
    REPO_ROOT,
    NotApplied,
    StaleToken,
    ToolServerError,
    applied_count,
    in_flight,
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
        assert stats(url) == {
            "calls": 0,
            "effects": 0,
            "by_key": {},
            "calls_by_key": {},
            "refused": 0,
            "refused_by_key": {},
            "in_flight": 0,
            "in_flight_keys": [],
        }


@pytest.mark.fault
@pytest.mark.anyio
async def test_toolserver_fenced_dedupes_and_refuses_stale_tokens(tmp_path: Path) -> None:
    with run_toolserver(tmp_path) as url:
        first = await post_effect(url, "wf-f:0:0", "fenced", None, token=2)
        assert first["applied"] is True

        with pytest.raises(StaleToken) as refused:
            await post_effect(url, "wf-f:0:0", "fenced", None, token=1)
        assert refused.value.status == 409
        assert refused.value.body == {
            "error": "stale fencing token",
            "key": "wf-f:0:0",
            "token": 1,
            "highest": 2,
        }
        assert await applied_count(url, "wf-f:0:0") == 1

        again = await post_effect(url, "wf-f:0:0", "fenced", None, token=2)
        assert again == {"effect_id": first["effect_id"], "key": "wf-f:0:0", "applied": False}
        newer = await post_effect(url, "wf-f:0:0", "fenced", None, token=3)
        assert newer["effect_id"] == first["effect_id"] and newer["applied"] is False
        with pytest.raises(StaleToken):  # token 2 is superseded now
            await post_effect(url, "wf-f:0:0", "fenced", None, token=2)
        assert await applied_count(url, "wf-f:0:0") == 1

        snapshot = stats(url)
        assert snapshot["calls_by_key"] == {"wf-f:0:0": 5}
        assert snapshot["refused"] == 2 and snapshot["refused_by_key"] == {"wf-f:0:0": 2}


@pytest.mark.fault
@pytest.mark.anyio
async def test_toolserver_hold_is_in_flight_after_applying(tmp_path: Path) -> None:
    with run_toolserver(tmp_path) as url:
        results: list[dict[str, object]] = []

        async def call() -> None:
            results.append(await post_effect(url, "wf-h:0:0", "plain", None, hold=0.6))

        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            with anyio.fail_after(3):
                while not await anyio.to_thread.run_sync(in_flight, url):
                    await anyio.sleep(0.02)
            assert await anyio.to_thread.run_sync(in_flight, url) == ["wf-h:0:0"]
            assert await applied_count(url, "wf-h:0:0") == 1  # applied before the reply
            assert not results
        assert results and results[0]["applied"] is True
        assert in_flight(url) == []
        assert stats(url)["in_flight"] == 0


@pytest.mark.fault
@pytest.mark.anyio
async def test_toolserver_fails_after_or_before_applying(tmp_path: Path) -> None:
    with run_toolserver(tmp_path) as url:
        with pytest.raises(ToolServerError) as after:
            await post_effect(url, "wf-a:0:0", "idempotent", None, fail_after_apply=True)
        assert after.value.status == 500 and isinstance(after.value, RuntimeError)
        assert not isinstance(after.value, StaleToken | NotApplied)
        assert after.value.body["error"] == "applied, then failed"
        assert await applied_count(url, "wf-a:0:0") == 1
        retry = await post_effect(url, "wf-a:0:0", "idempotent", None)
        assert retry["applied"] is False

        with pytest.raises(NotApplied) as before:
            await post_effect(url, "wf-b:0:0", "fenced", None, token=5, fail_before_apply=True)
        assert before.value.status == 503 and before.value.body["error"] == "not applied"
        assert await applied_count(url, "wf-b:0:0") == 0
        # nothing happened, not even the token: a lower token still goes through
        assert (await post_effect(url, "wf-b:0:0", "fenced", None, token=1))["applied"] is True
        assert stats(url)["refused"] == 0


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


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    request_queue_size = 128  # the default 5 drops SYNs under bursts (1 s retransmit stalls)


@contextlib.contextmanager
def _echo_server() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    received = bytearray()
    while len(received) < len(data):
        chunk = sock.recv(1 << 20)
        assert chunk, "unexpected EOF"
        received += chunk
    sender.join()
    return bytes(received)


def _assert_silent(sock: socket.socket) -> None:
    """No data, no EOF, no reset: ``recv`` just times out."""
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(16)


def _assert_closed(sock: socket.socket) -> None:
    sock.settimeout(1.0)
    try:
        assert sock.recv(16) == b""
    except ConnectionResetError:
        pass


@pytest.mark.fault
def test_blackhole_proxy_forwards_drops_silently_and_resets_on_heal() -> None:
    started = time.monotonic()
    with _echo_server() as port, BlackholeProxy("127.0.0.1", port) as proxy:
        assert proxy.url_for(f"redis://127.0.0.1:{port}/0") == f"redis://127.0.0.1:{proxy.port}/0"
        assert (
            proxy.url_for(f"postgresql://postgres@localhost:{port}/db?sslmode=disable")
            == f"postgresql://postgres@127.0.0.1:{proxy.port}/db?sslmode=disable"
        )
        with contextlib.ExitStack() as stack:
            pool = [
                stack.enter_context(socket.create_connection(proxy.address, timeout=2))
                for _ in range(20)
            ]
            for i, sock in enumerate(pool):
                sock.sendall(b"hello %d" % i)
            assert [sock.recv(64) for sock in pool] == [b"hello %d" % i for i in range(20)]
            big = os.urandom(4 << 20)
            assert _roundtrip(pool[0], big) == big

            proxy.blackhole()
            old = pool[1]
            old.sendall(b"ping")
            _assert_silent(old)
            during = stack.enter_context(socket.create_connection(proxy.address, timeout=2))
            during.sendall(b"ping")
            _assert_silent(during)

            proxy.heal()
            for sock in (old, during):
                _assert_closed(sock)
            with socket.create_connection(proxy.address, timeout=2) as fresh:
                assert _roundtrip(fresh, b"pong") == b"pong"
    assert time.monotonic() - started < 2.0
