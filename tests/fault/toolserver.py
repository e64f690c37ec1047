"""A counting HTTP "tool server" for fault tests, run as a separate process.

``python -m tests.fault.toolserver --port 0 --ready-file PATH`` binds 127.0.0.1
(port 0 = a free port), writes the chosen port to ``PATH`` atomically once it is
listening, and serves until SIGTERM/SIGINT. State lives in memory only.

Endpoints (JSON bodies):

* ``POST /effect`` ``{"key": str, "kind": "idempotent" | "plain" | "fenced",
  "payload": any}`` -> ``{"effect_id": int, "key": str, "applied": bool}``.
  ``idempotent`` calls are deduplicated by key: the first applies the effect, later
  ones get the stored ``effect_id`` back with ``applied: false``. Every ``plain``
  call applies an effect. ``fenced`` calls dedupe like ``idempotent`` and also
  carry ``"token": int`` (a fencing token): the server keeps the highest token seen
  per key and refuses a call with a lower one (HTTP 409 ``{"error": "stale fencing
  token", "key", "token", "highest"}``, nothing applied). A ``fenced`` call without
  a token is not fenced (it only dedupes). Optional fields, for every kind:

  - ``"fail_before_apply": true``: HTTP 503 ``{"error": "not applied"}``; nothing
    is applied and no token is recorded (the remote certainly did nothing).
  - ``"fail_after_apply": true``: apply (as above), then HTTP 500 ``{"error":
    "applied, then failed"}``; a refused call still gets its 409.
  - ``"hold": seconds``: decide and apply first, then wait ``hold`` seconds before
    replying; meanwhile the call counts in ``in_flight`` / ``in_flight_keys``.
  - ``"tag": str``: also count the call, and the effect if one is applied, under
    ``tag`` (see ``GET /tags``): a caller's own label of what the effect is (say
    workflow and step name), independent of the key the runtime chose.

* ``GET /effects?key=K`` -> ``{"key": K, "applied": n}`` (effects applied for ``K``).
* ``GET /stats`` -> ``{"calls": int, "effects": int, "by_key": {key: applied},
  "calls_by_key": {key: calls}, "refused": int, "refused_by_key": {key: refused},
  "in_flight": int, "in_flight_keys": [key, ...]}`` (every valid ``POST /effect``
  counts as a call, refused and failed ones included).
* ``GET /tags`` -> ``{"by_tag": {tag: applied}, "calls_by_tag": {tag: calls}}``: the
  calls that carried a ``tag``.
* ``POST /reset`` clears everything (calls still held finish normally).

The module also holds the clients: :func:`post_effect` / :func:`applied_count`
(asyncio, minimal HTTP/1.1, for tools inside worker processes; non-2xx replies
raise :class:`ToolServerError`, :class:`StaleToken` for 409 and
:class:`NotApplied` for 503), :func:`stats` / :func:`tags` / :func:`in_flight` / :func:`reset`
(sync, for the test process) and :func:`run_toolserver`, which runs the server
subprocess for the duration of a ``with`` block. Stdlib only.
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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

REPO_ROOT = Path(__file__).resolve().parents[2]
KINDS = ("idempotent", "plain", "fenced")
DEDUPED_KINDS = ("idempotent", "fenced")


@dataclass(frozen=True)
class EffectCall:
    """A validated ``POST /effect`` body."""

    key: str
    kind: str
    token: int | None = None
    hold: float = 0.0
    fail_before_apply: bool = False
    fail_after_apply: bool = False
    tag: str | None = None

    @classmethod
    def parse(cls, body: object) -> EffectCall:
        """Validate a request body; raises ``ValueError`` with the reason."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        key, kind = body.get("key"), body.get("kind", "plain")
        if not isinstance(key, str) or kind not in KINDS:
            raise ValueError('need {"key": str, "kind": "idempotent"|"plain"|"fenced"}')
        token = body.get("token")
        if token is not None and (not isinstance(token, int) or isinstance(token, bool)):
            raise ValueError('"token" must be an integer')
        hold = body.get("hold") or 0.0
        if isinstance(hold, bool) or not isinstance(hold, int | float) or hold < 0:
            raise ValueError('"hold" must be a number of seconds >= 0')
        flags = (body.get("fail_before_apply", False), body.get("fail_after_apply", False))
        if not all(isinstance(flag, bool) for flag in flags):
            raise ValueError('"fail_before_apply" / "fail_after_apply" must be booleans')
        tag = body.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise ValueError('"tag" must be a string')
        return cls(str(key), str(kind), token, float(hold), *flags, tag=tag)


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
            self._fenced_results: dict[str, int] = {}
            self._highest_token: dict[str, int] = {}
            self._refused_by_key: dict[str, int] = {}
            self._in_flight: Counter[str] = Counter()
            self._applied_by_tag: Counter[str] = Counter()
            self._calls_by_tag: Counter[str] = Counter()

    def effect(self, key: str, kind: str) -> dict[str, Any]:
        """Count a call and apply (or dedupe) its effect; the original entry point."""
        return self.call(EffectCall(key, kind))[1]

    def call(self, call: EffectCall) -> tuple[int, dict[str, Any]]:
        """Count ``call``, decide and apply it: ``(http_status, reply body)``.

        If ``call.hold`` is set the call is in flight from here (atomically with
        the apply) until :meth:`release`.
        """
        key = call.key
        with self._lock:
            self._calls += 1
            self._calls_by_key[key] = self._calls_by_key.get(key, 0) + 1
            if call.tag is not None:
                self._calls_by_tag[call.tag] += 1
            if call.hold > 0:
                self._in_flight[key] += 1
            if call.fail_before_apply:
                return 503, {"error": "not applied", "key": key}
            if call.kind == "fenced" and call.token is not None:
                highest = self._highest_token.get(key)
                if highest is not None and call.token < highest:
                    self._refused_by_key[key] = self._refused_by_key.get(key, 0) + 1
                    refusal = {"error": "stale fencing token", "key": key, "token": call.token}
                    return 409, {**refusal, "highest": highest}
                self._highest_token[key] = call.token
            result = self._apply(key, call.kind)
            if call.tag is not None and result["applied"]:
                self._applied_by_tag[call.tag] += 1
            if call.fail_after_apply:
                return 500, {"error": "applied, then failed", **result}
            return 200, result

    def _apply(self, key: str, kind: str) -> dict[str, Any]:
        results = self._fenced_results if kind == "fenced" else self._idempotent_results
        if kind in DEDUPED_KINDS and key in results:
            return {"effect_id": results[key], "key": key, "applied": False}
        effect_id = self._next_effect_id
        self._next_effect_id += 1
        self._applied_by_key[key] = self._applied_by_key.get(key, 0) + 1
        if kind in DEDUPED_KINDS:
            results[key] = effect_id
        return {"effect_id": effect_id, "key": key, "applied": True}

    def release(self, key: str) -> None:
        """A held call for ``key`` is about to reply."""
        with self._lock:
            if self._in_flight[key] > 0:
                self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]

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
                "refused": sum(self._refused_by_key.values()),
                "refused_by_key": dict(self._refused_by_key),
                "in_flight": sum(self._in_flight.values()),
                "in_flight_keys": sorted(self._in_flight.elements()),
            }

    def tags(self) -> dict[str, Any]:
        with self._lock:
            return {"by_tag": dict(self._applied_by_tag), "calls_by_tag": dict(self._calls_by_tag)}


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
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(data)  # the caller may have timed out during a hold

    def _read_json(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else {}

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        state = self.server.state
        if url.path == "/stats":
            self._reply(200, state.stats())
        elif url.path == "/tags":
            self._reply(200, state.tags())
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
            self._effect(body)
        else:
            self._reply(404, {"error": f"no route POST {path}"})

    def _effect(self, body: object) -> None:
        try:
            call = EffectCall.parse(body)
        except ValueError as exc:
            self._reply(400, {"error": str(exc)})
            return
        state = self.server.state
        status, result = state.call(call)
        if call.hold > 0:
            try:
                time.sleep(call.hold)
            finally:
                state.release(call.key)
        self._reply(status, result)


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


class ToolServerError(RuntimeError):
    """A non-2xx reply from the tool server (a ``RuntimeError``, as before)."""

    def __init__(self, message: str, status: int, body: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class StaleToken(ToolServerError):
    """HTTP 409: a fenced call carried a token lower than one already seen; not applied."""


class NotApplied(ToolServerError):
    """HTTP 503: the server certainly did not apply the effect."""


_ERRORS: dict[int, type[ToolServerError]] = {409: StaleToken, 503: NotApplied}


def _error_body(payload: bytes) -> dict[str, Any]:
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"raw": payload.decode(errors="replace")}


def _parse_response(raw: bytes, what: str) -> dict[str, Any]:
    header, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"{what}: truncated HTTP response ({len(raw)} bytes)")
    status_line = header.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ConnectionError(f"{what}: bad status line {status_line!r}")
    status = int(parts[1])
    if not 200 <= status < 300:
        message = f"{what}: HTTP {status}: {payload.decode(errors='replace')}"
        raise _ERRORS.get(status, ToolServerError)(message, status, _error_body(payload))
    result = json.loads(payload)
    if not isinstance(result, dict):
        raise RuntimeError(f"{what}: expected a JSON object, got {result!r}")
    return result


async def post_effect(
    base_url: str,
    key: str,
    kind: str,
    payload: object,
    timeout: float | None = None,
    *,
    token: int | None = None,
    hold: float | None = None,
    fail_after_apply: bool = False,
    fail_before_apply: bool = False,
    tag: str | None = None,
) -> dict[str, object]:
    """``POST /effect``; returns ``{"effect_id", "key", "applied"}``.

    ``tag``: also counted under this label (see :func:`tags`).

    Raises :class:`StaleToken` (409), :class:`NotApplied` (503) or
    :class:`ToolServerError` (any other non-2xx, e.g. 500 for ``fail_after_apply``).
    ``timeout`` defaults to 5 s plus ``hold``.
    """
    body: dict[str, object] = {"key": key, "kind": kind, "payload": payload}
    if token is not None:
        body["token"] = token
    if hold is not None:
        body["hold"] = hold
    if fail_after_apply:
        body["fail_after_apply"] = True
    if fail_before_apply:
        body["fail_before_apply"] = True
    if tag is not None:
        body["tag"] = tag
    if timeout is None:
        timeout = 5.0 + (hold or 0.0)
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


def tags(base_url: str, timeout: float = 5.0) -> dict[str, Any]:
    """``GET /tags`` from the test process: ``{"by_tag": ..., "calls_by_tag": ...}``."""
    return _sync_request(base_url, "GET", "/tags", timeout)


def in_flight(base_url: str, timeout: float = 5.0) -> list[str]:
    """Keys of the calls the server is holding right now (one entry per call)."""
    return [str(key) for key in stats(base_url, timeout)["in_flight_keys"]]


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
