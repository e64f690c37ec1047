"""A counting HTTP "tool server" for fault tests, run as a separate process.

``python -m tests.fault.toolserver --port 0 --ready-file PATH`` binds 127.0.0.1
(port 0 = a free port), writes the chosen port to ``PATH`` atomically once it is
listening, and serves until SIGTERM/SIGINT. State lives in memory only.

Endpoints (JSON bodies):

* ``POST /effect`` ``{"key": str, "kind": "idempotent" | "plain", "payload": any}``
  -> ``{"effect_id": int, "key": str, "applied": bool}``. ``idempotent`` calls are
  deduplicated by key: the first applies the effect, later ones get the stored
  ``effect_id`` back with ``applied: false``. Every ``plain`` call applies an effect.
* ``GET /effects?key=K`` -> ``{"key": K, "applied": n}`` (effects applied for ``K``).
* ``GET /stats`` -> ``{"calls": int, "effects": int, "by_key": {key: applied},
  "calls_by_key": {key: calls}}``.
* ``POST /reset`` clears everything.

The module also holds the clients: :func:`post_effect` / :func:`applied_count`
(asyncio, minimal HTTP/1.1, for tools inside worker processes), :func:`stats` /
:func:`reset` (sync, for the test process) and :func:`run_toolserver`, which runs
the server subprocess for the duration of a ``with`` block. Stdlib only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("idempotent", "plain")


class ToolState:
    """Thread-safe counters behind the endpoints."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._calls = 0
            self._next_effect_id = 1
            self._applied_by_key: dict[str, int] = {}
            self._calls_by_key: dict[str, int] = {}
            self._idempotent_results: dict[str, int] = {}

    def effect(self, key: str, kind: str) -> dict[str, Any]:
        with self._lock:
            self._calls += 1
            self._calls_by_key[key] = self._calls_by_key.get(key, 0) + 1
            if kind == "idempotent" and key in self._idempotent_results:
                return {"effect_id": self._idempotent_results[key], "key": key, "applied": False}
            effect_id = self._next_effect_id
            self._next_effect_id += 1
            self._applied_by_key[key] = self._applied_by_key.get(key, 0) + 1
            if kind == "idempotent":
                self._idempotent_results[key] = effect_id
            return {"effect_id": effect_id, "key": key, "applied": True}

    def applied(self, key: str) -> int:
        with self._lock:
            return self._applied_by_key.get(key, 0)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._calls,
                "effects": sum(self._applied_by_key.values()),
                "by_key": dict(self._applied_by_key),
                "calls_by_key": dict(self._calls_by_key),
            }


class _Handler(BaseHTTPRequestHandler):
    server: ToolHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        state = self.server.state
        if url.path == "/stats":
            self._reply(200, state.stats())
        elif url.path == "/effects":
            keys = parse_qs(url.query).get("key")
            if not keys:
                self._reply(400, {"error": "missing ?key="})
                return
            self._reply(200, {"key": keys[0], "applied": state.applied(keys[0])})
        else:
            self._reply(404, {"error": f"no route GET {url.path}"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._read_json()
        except (ValueError, UnicodeDecodeError) as exc:
            self._reply(400, {"error": f"invalid JSON: {exc}"})
            return
        state = self.server.state
        if path == "/reset":
            state.reset()
            self._reply(200, {"reset": True})
        elif path == "/effect":
            key = body.get("key") if isinstance(body, dict) else None
            kind = body.get("kind", "plain") if isinstance(body, dict) else None
            if not isinstance(key, str) or kind not in KINDS:
                self._reply(400, {"error": 'need {"key": str, "kind": "idempotent"|"plain"}'})
                return
            self._reply(200, state.effect(key, str(kind)))
        else:
            self._reply(404, {"error": f"no route POST {path}"})


class ToolHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default 5 drops SYNs under bursts (1 s retransmit stalls)

    def __init__(self, port: int) -> None:
        self.state = ToolState()
        super().__init__(("127.0.0.1", port), _Handler)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def serve(port: int, ready_file: Path | None) -> None:
    """Serve until SIGTERM or SIGINT, then close the listening socket and return."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with ToolHTTPServer(port) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1})
        thread.start()
        if ready_file is not None:
            _write_atomically(ready_file, str(httpd.server_address[1]))
        while not stop.wait(0.5):
            pass
        httpd.shutdown()
        thread.join()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    serve(args.port, args.ready_file)


# --------------------------------------------------------------------------- clients


async def _request(
    base_url: str, method: str, path: str, body: object | None, timeout: float
) -> dict[str, Any]:
    return await asyncio.wait_for(_request_unbounded(base_url, method, path, body), timeout)


async def _request_unbounded(
    base_url: str, method: str, path: str, body: object | None
) -> dict[str, Any]:
    url = urlsplit(base_url)
    host = url.hostname or "127.0.0.1"
    port = url.port or 80
    data = b"" if body is None else json.dumps(body).encode()
    head = (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + data)
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return _parse_response(raw, f"{method} {base_url}{path}")


def _parse_response(raw: bytes, what: str) -> dict[str, Any]:
    header, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"{what}: truncated HTTP response ({len(raw)} bytes)")
    status_line = header.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"{what}: bad status line {status_line!r}")
    status = int(parts[1])
    if status != 200:
        raise RuntimeError(f"{what}: HTTP {status}: {payload.decode(errors='replace')}")
    result = json.loads(payload)
    if not isinstance(result, dict):
        raise RuntimeError(f"{what}: expected a JSON object, got {result!r}")
    return result


async def post_effect(
    base_url: str, key: str, kind: str, payload: object, timeout: float = 5.0
) -> dict[str, object]:
    """``POST /effect``; returns ``{"effect_id", "key", "applied"}``."""
    body = {"key": key, "kind": kind, "payload": payload}
    return await _request(base_url, "POST", "/effect", body, timeout)


async def applied_count(base_url: str, key: str, timeout: float = 5.0) -> int:
    """How many times an effect was applied for ``key`` (0 if never): a reconcile check."""
    result = await _request(base_url, "GET", f"/effects?key={quote(key, safe='')}", None, timeout)
    return int(result["applied"])


def _sync_request(base_url: str, method: str, path: str, timeout: float) -> dict[str, Any]:
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(f"{base_url}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        result = json.loads(response.read())
    if not isinstance(result, dict):
        raise RuntimeError(f"{method} {base_url}{path}: expected a JSON object, got {result!r}")
    return result


def stats(base_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /stats`` from the test process."""
    return _sync_request(base_url, "GET", "/stats", timeout)


def reset(base_url: str, timeout: float = 5.0) -> None:
    """``POST /reset`` from the test process."""
    _sync_request(base_url, "POST", "/reset", timeout)


@contextlib.contextmanager
def run_toolserver(tmp_dir: Path) -> Iterator[str]:
    """Run the tool server as a subprocess; yield ``http://127.0.0.1:PORT``.

    Its stdout/stderr go to ``tmp_dir/toolserver-*.log``. At exit it gets
    SIGTERM, then SIGKILL after 5 s.
    """
    tmp_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(4)
    ready = tmp_dir / f"toolserver-{token}.port"
    log_path = tmp_dir / f"toolserver-{token}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "tests.fault.toolserver", "--port", "0", "--ready-file"]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*cmd, str(ready)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        port = _wait_ready(proc, ready, log_path, timeout=10.0)
        yield f"http://127.0.0.1:{port}"
    finally:
        _terminate(proc, grace=5.0)


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        if ready.exists():
            return int(ready.read_text().strip())
        if proc.poll() is not None:
            raise RuntimeError(f"toolserver exited {proc.returncode}: {log.read_text().strip()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"toolserver not ready within {timeout} s: {log.read_text()}")
        time.sleep(0.02)


def _terminate(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
