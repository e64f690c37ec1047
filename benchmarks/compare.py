"""Benchmark: the same ticket workflow on this runtime, DBOS, LangGraph, Celery and a hand loop.

Starts ONE private PostgreSQL 16 (+pgvector, synchronous_commit on: the defaults) and
ONE private redis-server (tests/fault/servers.py), then runs every system once per
round, the order rotated each round (``--reps`` rounds), each in a fresh database
on those servers (Redis flushed before each run). Each system is a small driver in
benchmarks/peers/ run as a subprocess: DBOS, LangGraph and Celery from their own
virtual environments under benchmarks/.venvs/ (created once with pinned versions
from PyPI, reused after), this runtime and the hand-written loop with this Python.

The workload (benchmarks/peers/common.py): a 3-step ticket workflow, triage ->
research -> response, stub agents returning small dicts, one no-op tool call in
research, on a small ticket dict. Per run:

* latency: after a warm-up batch and ``--latency-warmup`` sequential workflows,
  ``--latency`` workflows one at a time, each submitted and awaited by the caller;
  p50 and p99 of that caller-observed time;
* throughput: ``--workflows`` submitted at once, wall time from the first submit
  until all are done;
* around the throughput phase: worker CPU (utime + stime of the processes running
  the workflow code and their children, from /proc; for rows in the client's process,
  the whole driver), Postgres transactions committed in the system's database
  (pg_stat_database.xact_commit, read-only ones and a pool's reset queries included;
  the peer exits after the phase, and a backend flushes its statistics on exit, so
  the count is exact once ``--settle`` let the earlier phases' counts land), write
  transactions exactly (transaction ids assigned, pg_current_snapshot's xmax;
  cluster-wide), WAL bytes (pg_current_wal_lsn; pg_waldump's per-record statistics
  of each run, and its WAL per table and index, are kept beside the peers' logs), and
  the Postgres and Redis servers' CPU;
* CPU steal (/proc/stat) and CPU used by processes outside this benchmark over the
  phase: a run with steal > 2 % or others using > 10 % of the machine is noisy. The
  medians leave noisy runs out while a row has a clean one (``--keep-noisy``: never).

The peers talk a small stdin/stdout protocol (benchmarks/peers/common.py): the
latency phase first, then READY; compare.py snapshots and sends GO; the throughput
phase, then the peer exits. The measuring queries run in the ``postgres`` database,
not the system's, and assign no transaction id. A CHECKPOINT precedes each run, so
no timed checkpoint falls inside one (the default checkpoint_timeout is 5 minutes).

    python benchmarks/compare.py --reps 3 --workflows 2000 --latency 200
    python benchmarks/compare.py --systems runtime,loop --processes 1,2,4 --reps 1
    python benchmarks/compare.py --runtime-root /tmp/before ...   # another checkout's runtime
    python benchmarks/compare.py --systems runtime,runtime@filled --fill 1000000

A runtime row named with ``@filled`` runs on a copy of a template database whose
tables already hold ``--fill`` finished workflows (benchmarks/history.py, filled once
per invocation): the same figures as its history grows.

Progress goes to stderr; the markdown table, the ratios and the machine line to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks" / "peers")]
from common import TICKS, cpu_seconds  # noqa: E402

from tests.fault.servers import PostgresServer, RedisServer  # noqa: E402

PEERS_DIR = REPO_ROOT / "benchmarks" / "peers"
VENVS_DIR = REPO_ROOT / "benchmarks" / ".venvs"
# Pinned: the newest on PyPI when this was written.
REQUIREMENTS = {
    "dbos": ["dbos==3.4.0"],
    "langgraph": [
        "langgraph==1.2.22",
        "langgraph-checkpoint-postgres==3.2.0",
        "psycopg[binary]==3.3.9",
        "psycopg-pool==3.3.3",
    ],
    "celery": ["celery[redis]==5.7.0"],
}
# Distributions whose versions the machine line names, per venv (None: this Python's).
VERSIONS = {
    None: ["redis", "asyncpg", "hiredis"],
    "dbos": ["dbos", "psycopg", "sqlalchemy"],
    "langgraph": ["langgraph", "langgraph-checkpoint-postgres", "psycopg", "psycopg-pool"],
    "celery": ["celery", "kombu", "redis"],
}
DEFAULT_SYSTEMS = "runtime,runtime-2,dbos,langgraph,celery,loop"
DASH, TIMES = "\u2013", "\u00d7"  # the table's en dash and multiplication sign
STEAL_NOISY_PCT = 2.0
OTHERS_NOISY_PCT = 10.0
COLUMNS = (
    ("wf_per_s", "wf/s, {n} at once", "{:.0f}"),
    ("p50_ms", "p50 ms, one at a time", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("worker_cpu_ms", "worker CPU ms/wf", "{:.2f}"),
    ("pg_commits", "PG commits/wf", "{:.2f}"),
    ("pg_writes", "PG write commits/wf", "{:.2f}"),
    ("wal_kib", "WAL KiB/wf", "{:.2f}"),
)
EXTRA_COLUMNS = (
    ("pg_cpu_ms", "Postgres CPU ms/wf", "{:.2f}"),
    ("redis_cpu_ms", "Redis CPU ms/wf", "{:.2f}"),
    ("steal_pct", "steal %", "{:.1f}"),
    ("others_pct", "others' CPU %", "{:.1f}"),
    ("load1", "loadavg 1 min at start", "{:.2f}"),
)


@dataclass(frozen=True)
class System:
    key: str
    label: str
    script: str
    venv: str | None  # None: this Python (the runtime's venv)
    args: tuple[str, ...] = ()
    in_postgres: bool = True
    filled: bool = False  # runs on a copy of the template with --fill finished workflows


def systems_for(keys: list[str], processes: list[int] | None) -> list[System]:
    """The systems named; ``processes`` replaces the runtime-N rows by one per count."""
    if processes is not None:
        first = next((i for i, k in enumerate(keys) if k.startswith("runtime-")), len(keys))
        keys = [k for k in keys if not k.startswith("runtime-")]
        keys[first:first] = [f"runtime-{n}" for n in processes]
    found: list[System] = []
    for key in keys:
        if key.endswith(FILLED):
            found.append(filled_system(key))
        elif key == "runtime":
            label = "this runtime, workers in the client's process"
            found.append(System(key, label, "runtime_peer.py", None, ("--processes", "0")))
        elif key.startswith("runtime-") and key[8:].isdigit() and int(key[8:]) > 0:
            n = int(key[8:])
            label = f"this runtime, {n} worker process{'es' if n > 1 else ''}"
            found.append(System(key, label, "runtime_peer.py", None, ("--processes", str(n))))
        elif key == "dbos":
            found.append(System(key, "DBOS {dbos}", "dbos_peer.py", "dbos"))
        elif key == "langgraph":
            label = "LangGraph {langgraph} + AsyncPostgresSaver"
            found.append(System(key, label, "langgraph_peer.py", "langgraph"))
        elif key == "celery":
            label = "Celery {celery} (Redis broker and results, nothing in Postgres)"
            found.append(System(key, label, "celery_peer.py", "celery", in_postgres=False))
        elif key == "loop":
            label = (
                "hand-written loop: redis-py + asyncpg, per step XREADGROUP COUNT 1, HSET, "
                "one INSERT, XADD, XACK, each awaited in turn"
            )
            found.append(System(key, label, "loop_peer.py", None))
        else:
            raise SystemExit(f"unknown system {key!r}")
    return found


def filled_system(key: str) -> System:
    """``<runtime row>@filled``: that row on a copy of the filled template."""
    [plain] = systems_for([key.removesuffix(FILLED)], None)
    if plain.script != "runtime_peer.py":
        raise SystemExit(f"{key!r}: only the runtime's rows run on a filled history")
    label = plain.label + ", {filled} finished workflows in its tables"
    args = (*plain.args, "--prefix", FILLED_SCHEMA.replace("_", "-"))
    return System(key, label, plain.script, None, args, filled=True)


# --------------------------------------------------------------------------- venvs


def venv_python(name: str | None) -> Path:
    return Path(sys.executable) if name is None else VENVS_DIR / name / "bin" / "python"


def ensure_venv(name: str) -> None:
    """Create benchmarks/.venvs/NAME with the pinned requirements, unless it has them."""
    root, wanted = VENVS_DIR / name, "\n".join(REQUIREMENTS[name]) + "\n"
    marker = root / "requirements.txt"
    if marker.exists() and marker.read_text() == wanted and venv_python(name).exists():
        return
    progress(f"creating {root} ({', '.join(REQUIREMENTS[name])}) ...")
    if not venv_python(name).exists():
        subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    pip = [str(venv_python(name)), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, *REQUIREMENTS[name]], check=True)
    marker.write_text(wanted)


def versions(venvs: set[str | None]) -> dict[str, dict[str, str]]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(d):\n"
        "    try:\n"
        "        return m.version(d)\n"
        "    except m.PackageNotFoundError:\n"
        "        return 'absent'\n"
        "print(json.dumps({d: v(d) for d in sys.argv[1:]}))"
    )
    found: dict[str, dict[str, str]] = {}
    for name in sorted(venvs, key=str):
        dists = VERSIONS[name]
        out = subprocess.run(
            [str(venv_python(name)), "-c", code, *dists], capture_output=True, text=True, check=True
        )
        found[name or "runtime venv"] = json.loads(out.stdout)
    return found


# --------------------------------------------------------------------------- measuring


def progress(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def proc_stat() -> list[int]:
    """The machine's jiffies: user nice system idle iowait irq softirq steal ..."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


@dataclass
class Servers:
    pg: PostgresServer
    redis: RedisServer
    admin: asyncpg.Connection  # on the ``postgres`` database: never the measured one

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg.port}/{database}"


SNAPSHOT = """
SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = $1) AS commits,
       pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS next_xid,
       pg_current_wal_lsn()::text AS lsn
"""


async def snapshot(servers: Servers, database: str) -> dict[str, Any]:
    await servers.admin.execute("SELECT pg_stat_clear_snapshot()")
    row = await servers.admin.fetchrow(SNAPSHOT, database)
    assert row is not None
    high, low = row["lsn"].split("/")
    return {
        "lsn": row["lsn"],
        "commits": int(row["commits"] or 0),
        "next_xid": int(row["next_xid"]),
        "wal": (int(high, 16) << 32) + int(low, 16),
        "pg_cpu": cpu_seconds([servers.pg.pid or 0]),
        "redis_cpu": cpu_seconds([servers.redis.pid or 0]),
        "own_cpu": cpu_seconds([os.getpid()]),  # this process, the peer, redis-server
        "stat": proc_stat(),
        "t": time.monotonic(),
    }


def window(before: dict[str, Any], after: dict[str, Any], workflows: int) -> dict[str, float]:
    """Per-workflow server figures and the noise measures between two snapshots."""
    jiffies = [b - a for a, b in zip(before["stat"], after["stat"], strict=False)]
    total = sum(jiffies[:8]) or 1  # guest time is already in user
    busy = jiffies[0] + jiffies[1] + jiffies[2] + jiffies[5] + jiffies[6]
    # own_cpu already holds redis-server (a child of this process); Postgres daemonizes.
    ours = sum(after[k] - before[k] for k in ("pg_cpu", "own_cpu")) * TICKS
    return {
        "pg_commits": (after["commits"] - before["commits"]) / workflows,
        "pg_writes": (after["next_xid"] - before["next_xid"]) / workflows,
        "wal_kib": (after["wal"] - before["wal"]) / 1024 / workflows,
        "pg_cpu_ms": (after["pg_cpu"] - before["pg_cpu"]) * 1000 / workflows,
        "redis_cpu_ms": (after["redis_cpu"] - before["redis_cpu"]) * 1000 / workflows,
        "steal_pct": jiffies[7] * 100 / total,
        "others_pct": max(0.0, busy - ours) * 100 / total,
    }


def waldump(pg: PostgresServer, start: str, end: str, out: Path) -> dict[str, tuple[int, int]]:
    """pg_waldump's per-record statistics over [start, end), kept in ``out``:
    {record type: (count, full-page-image bytes)}."""
    if start == end:
        out.write_text("no WAL written\n")
        return {}
    cmd = [str(pg.bin_dir / "pg_waldump"), "-p", str(pg.data_dir / "pg_wal")]
    cmd += ["-s", start, "-e", end, "--stats=record"]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
    )
    out.write_text(done.stdout + done.stderr)
    found: dict[str, tuple[int, int]] = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        # "Type N (%) size (%) fpi-size (%) combined (%)": the percentages are "(x.xx)".
        if len(parts) >= 6 and "/" in parts[0] and parts[1].isdigit():
            numbers = [p for p in parts[1:] if p.isdigit()]
            found[parts[0]] = (int(numbers[0]), int(numbers[2]))
    return found


RELATIONS = """
SELECT c.relfilenode, n.nspname || '.' || c.relname AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relfilenode <> 0
"""


async def wal_by_relation(
    pg: PostgresServer, start: str, end: str, database_url: str, workflows: int, out: Path
) -> None:
    """The WAL of [start, end) per table and index (bytes per workflow, largest first),
    from pg_waldump's records (each counted on its first block's relation), kept in
    ``out``: where a system's WAL goes, for the next change to aim at."""
    if start == end:
        return
    cmd = [str(pg.bin_dir / "pg_waldump"), "-p", str(pg.data_dir / "pg_wal"), "-s", start]
    done = subprocess.run([*cmd, "-e", end], capture_output=True, text=True)
    total: dict[str, list[int]] = {}
    for line in done.stdout.splitlines():
        size = line.partition("len (rec/tot):")[2].partition(",")[0].split("/")
        rel = line.partition(" rel ")[2].split(" ")[0]
        if len(size) == 2:
            key = rel.rsplit("/", 1)[-1] if rel else line.split()[1]  # no block: its rmgr
            entry = total.setdefault(key, [0, 0])
            entry[0] += 1
            entry[1] += int(size[1])
    conn = await asyncpg.connect(database_url)
    try:
        names = {str(r["relfilenode"]): r["name"] for r in await conn.fetch(RELATIONS)}
    finally:
        await conn.close()
    rows = sorted(total.items(), key=lambda kv: -kv[1][1])
    out.write_text(
        "relation (or record type)                      records/wf   bytes/wf\n"
        + "".join(
            f"{names.get(k, k):<46} {n / workflows:>10.2f} {b / workflows:>10.0f}\n"
            for k, (n, b) in rows
        )
    )


# --------------------------------------------------------------------------- one run


@dataclass
class Peer:
    proc: asyncio.subprocess.Process
    log_path: Path
    results: dict[str, Any] = field(default_factory=dict)

    async def expect(self, tag: str, timeout: float) -> None:
        """Read stdout until the line ``tag`` (with its JSON); other lines go to the log."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), max(left, 0.01))
            except TimeoutError:
                self.proc.send_signal(signal.SIGUSR1)  # its stacks, to its log
                await asyncio.sleep(1)
                raise RuntimeError(f"no {tag} within {timeout:g} s{self.tail()}") from None
            if not raw:
                await self.proc.wait()
                raise RuntimeError(f"exited {self.proc.returncode} before {tag}{self.tail()}")
            line = raw.decode(errors="replace").rstrip("\n")
            word, _, rest = line.partition(" ")
            if word == tag:
                self.results[tag] = json.loads(rest) if rest else None
                return
            with open(self.log_path, "a") as log:
                log.write(f"[stdout] {line}\n")

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"; the end of {self.log_path}:\n" + "\n".join(text)

    async def kill(self) -> None:
        """The peer and whatever it started and left behind (its own process group)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break  # none left
            await asyncio.sleep(1.0)
        if self.proc.returncode is None:
            await self.proc.wait()


async def sql_name(servers: Servers, template: str, name: str) -> None:
    """DDL naming a database: the name is quoted by the server (format %I), never here."""
    await servers.admin.execute(await servers.admin.fetchval(template, name))


CREATE_DB = "SELECT format('CREATE DATABASE %I', $1::text)"
# A copy of the filled history: file_copy, not WAL_LOG, so the copy writes no WAL.
COPY_DB = "SELECT format('CREATE DATABASE %I TEMPLATE %I STRATEGY file_copy', $1::text, $2::text)"
CREATE_SCHEMA = "SELECT format('CREATE SCHEMA %I', $1::text)"
FILLED = "@filled"  # a runtime row's suffix: run it on a copy of the filled template
FILLED_DB = "cmp_filled_template"
FILLED_SCHEMA = "cmp_filled"  # the runtime peer's schema when given --prefix cmp-filled
DROP_DB = "SELECT format('DROP DATABASE IF EXISTS %I WITH (FORCE)', $1::text)"
BACKENDS = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"


async def run_system(
    system: System, rnd: int, servers: Servers, opts: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    database = f"cmp_{system.key.replace('-', '_')}_{rnd}"
    servers.redis.flush()
    await sql_name(servers, DROP_DB, database)
    if system.filled:
        await servers.admin.execute(await servers.admin.fetchval(COPY_DB, database, FILLED_DB))
    else:
        await sql_name(servers, CREATE_DB, database)
    await servers.admin.execute("CHECKPOINT")
    cmd = [str(venv_python(system.venv)), str(PEERS_DIR / system.script), *system.args]
    cmd += ["--redis-url", servers.redis.url, "--database-url", servers.url(database)]
    cmd += ["--workflows", str(opts.workflows), "--warmup", str(opts.warmup)]
    cmd += ["--latency-n", str(opts.latency), "--latency-warmup", str(opts.latency_warmup)]
    cmd += ["--concurrency", str(opts.concurrency)]
    log_path = logs / f"{system.key}-{rnd}.log"
    load1 = os.getloadavg()[0]
    with open(log_path, "w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            env=peer_env(opts.runtime_root if system.venv is None else None),
            cwd=PEERS_DIR,
            start_new_session=True,  # one process group: killed whole on failure
        )
    peer = Peer(proc, log_path)
    try:
        await peer.expect("LATENCY", opts.timeout)
        await peer.expect("READY", 30)
        # A backend that flushed its statistics less than a second ago keeps the next
        # ones up to 10 s (PGSTAT_IDLE_INTERVAL): let the warm-up's commits land first.
        await asyncio.sleep(opts.settle)
        before = await snapshot(servers, database)
        assert proc.stdin is not None
        proc.stdin.write(b"GO\n")
        await proc.stdin.drain()
        await peer.expect("THROUGHPUT", opts.timeout)
        try:
            await asyncio.wait_for(proc.wait(), 60)
        except TimeoutError:
            proc.send_signal(signal.SIGUSR1)  # its stacks, to its log
            await asyncio.sleep(1)
            raise RuntimeError(f"did not exit after its last phase{peer.tail()}") from None
        if proc.returncode != 0:
            raise RuntimeError(f"exited {proc.returncode}{peer.tail()}")
        for _ in range(200):  # the peer's backends flush their statistics as they exit
            if not await servers.admin.fetchval(BACKENDS, database):
                break
            await asyncio.sleep(0.05)
        after = await snapshot(servers, database)
        # Now: DROP DATABASE checkpoints, and the segments before it may be recycled.
        wal_path = logs / f"{system.key}-{rnd}.wal.txt"
        wal = waldump(servers.pg, before["lsn"], after["lsn"], wal_path)
        await wal_by_relation(
            servers.pg,
            before["lsn"],
            after["lsn"],
            servers.url(database),
            opts.workflows,
            logs / f"{system.key}-{rnd}.wal-by-relation.txt",
        )
    finally:
        await peer.kill()
        await sql_name(servers, DROP_DB, database)
    thr, lat = peer.results["THROUGHPUT"], peer.results["LATENCY"]
    if thr["completed"] != thr["workflows"]:
        raise RuntimeError(f"{system.key}: {thr['completed']} of {thr['workflows']} completed")
    result = {
        "system": system.key,
        "round": rnd,
        "wf_per_s": thr["wf_per_s"],
        "seconds": thr["seconds"],
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "worker_cpu_ms": thr["worker_cpu_s"] * 1000 / thr["workflows"],
        **window(before, after, thr["workflows"]),
        "wal_commits": wal.get("Transaction/COMMIT", (0, 0))[0] / thr["workflows"],
        "wal_fpi_pct": 100 * sum(v[1] for v in wal.values()) / max(1, after["wal"] - before["wal"]),
        "load1": load1,
        "note": thr.get("note", ""),
    }
    result["noisy"] = (
        result["steal_pct"] > STEAL_NOISY_PCT or result["others_pct"] > OTHERS_NOISY_PCT
    )
    return result


def check_runtime_root(root: Path) -> None:
    """The runtime peer must import ``orchestrator`` from ``root``, not an installed copy."""
    code = "import orchestrator; print(orchestrator.__file__)"
    found = subprocess.run(
        [sys.executable, "-c", code],
        env=peer_env(root),
        cwd=PEERS_DIR,  # as for a peer: its script's directory comes first on sys.path
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not found.startswith(str(root) + os.sep):
        raise SystemExit(f"the runtime peer would import {found or 'nothing'}, not {root}")
    progress(f"runtime: {found}")


def peer_env(runtime_root: Path | None) -> dict[str, str]:
    drop = ("ORCHESTRATOR_", "REDIS_URL", "DATABASE_URL", "DBOS_", "PG", "CELERY_", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["OPENAI_API_KEY"] = ""
    if runtime_root is not None:
        env["PYTHONPATH"] = str(runtime_root)
    return env


# --------------------------------------------------------------------------- report


def cell(used: list[float], every: list[float], fmt: str) -> str:
    """The median of the runs used, and the range of every run."""
    if not used:
        return DASH
    mid = fmt.format(statistics.median(used))
    if len(every) == 1:
        return mid
    return f"{mid} ({fmt.format(min(every))}{DASH}{fmt.format(max(every))})"


def counted(runs: list[dict[str, Any]], keep_noisy: bool) -> list[dict[str, Any]]:
    """The runs a row's medians use: the clean ones, unless there are none."""
    clean = [r for r in runs if not r["noisy"]]
    return runs if keep_noisy or not clean else clean


def medians(
    systems: list[System], runs: list[dict[str, Any]], keep_noisy: bool
) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for s in systems:
        used = counted([r for r in runs if r["system"] == s.key], keep_noisy)
        if used:
            keys = [c[0] for c in (*COLUMNS, *EXTRA_COLUMNS)]
            found[s.key] = {k: statistics.median(r[k] for r in used) for k in keys}
    return found


def table(
    systems: list[System],
    runs: list[dict[str, Any]],
    opts: argparse.Namespace,
    labels: dict[str, str],
    columns: tuple[tuple[str, str, str], ...],
) -> list[str]:
    heads = [title.format(n=f"{opts.workflows:,}") for _, title, _ in columns]
    lines = ["| system | " + " | ".join(heads) + " | runs (noisy) |"]
    lines.append("|---" * (len(columns) + 2) + "|")
    for s in systems:
        mine = [r for r in runs if r["system"] == s.key]
        used = counted(mine, opts.keep_noisy)
        cells = []
        for key, _, fmt in columns:
            postgres_only = key in ("pg_commits", "pg_writes", "wal_kib", "pg_cpu_ms")
            skip = postgres_only and not s.in_postgres
            values = [r[key] for r in used], [r[key] for r in mine]
            cells.append(DASH if skip else cell(*values, fmt))
        noisy = sum(r["noisy"] for r in mine)
        lines.append(f"| {labels[s.key]} | " + " | ".join(cells) + f" | {len(mine)} ({noisy}) |")
    return lines


def ratios(systems: list[System], med: dict[str, dict[str, float]]) -> list[str]:
    lines = []
    for s in systems:
        if not s.key.startswith("runtime") or s.key not in med:
            continue
        mine = med[s.key]
        parts = [
            f"{mine['wf_per_s'] / med[o]['wf_per_s']:.2f}{TIMES} {o}"
            for o in ("loop", "dbos", "langgraph", "celery")
            if o in med
        ]
        if "loop" in med:
            parts.append(f"p50 {mine['p50_ms'] / med['loop']['p50_ms']:.2f}{TIMES} loop's")
        plain = s.key.removesuffix(FILLED)
        if s.filled and plain in med:
            parts.append(
                f"{mine['wf_per_s'] / med[plain]['wf_per_s']:.2f}{TIMES} wf/s and "
                f"{mine['p50_ms'] / med[plain]['p50_ms']:.2f}{TIMES} p50 of {plain} "
                "(empty tables)"
            )
        if parts:
            lines.append(f"- {s.key} throughput: " + ", ".join(parts))
    return lines


def machine_line(
    servers: Servers, vers: dict[str, dict[str, str]], opts: argparse.Namespace
) -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    pg_version = servers.pg.psql("SHOW server_version").strip()
    with redis.Redis.from_url(servers.redis.url) as r:
        redis_version = r.info("server")["redis_version"]
    commit = subprocess.run(
        ["git", "-C", str(opts.runtime_root), "log", "-1", "--format=%h %s"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    packages = "; ".join(
        f"{venv}: " + ", ".join(f"{d} {v}" for d, v in found.items())
        for venv, found in vers.items()
    )
    return (
        f"Machine: {model}, {os.cpu_count()} cores, "
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; Python "
        f"{platform.python_version()}; PostgreSQL {pg_version}, Redis {redis_version}; "
        f"{packages}; runtime at {opts.runtime_root} ({commit})"
    )


# --------------------------------------------------------------------------- main


async def bench(opts: argparse.Namespace, systems: list[System]) -> None:
    started = time.monotonic()
    logs = Path(tempfile.mkdtemp(prefix="compare-logs-"))
    progress(f"peer logs in {logs}")
    runs: list[dict[str, Any]] = []
    failures: list[str] = []
    with RedisServer() as redis_server, PostgresServer() as pg:
        admin = await asyncpg.connect(pg.url)
        try:
            servers = Servers(pg, redis_server, admin)
            if any(s.filled for s in systems):
                await fill_template(servers, opts.fill)
            vers = versions({s.venv for s in systems})
            names = {k: v for found in vers.values() for k, v in found.items()}
            labels = {s.key: s.label.format(**names, filled=f"{opts.fill:,}") for s in systems}
            for rnd in range(opts.reps):
                shift = rnd % len(systems)
                order = systems[shift:] + systems[:shift]
                for system in order:
                    progress(f"round {rnd + 1}/{opts.reps}: {system.key} ...")
                    run_started = time.monotonic()
                    try:
                        run = await run_system(system, rnd, servers, opts, logs)
                    except Exception as e:  # one failed run must not lose the others
                        failures.append(f"{system.key}, round {rnd + 1}: {e}")
                        progress(f"  FAILED: {e}")
                        continue
                    runs.append(run)
                    progress(f"  {summary(run)} [{time.monotonic() - run_started:.0f} s]")
            med = medians(systems, runs, opts.keep_noisy)
            print_report(systems, runs, med, labels, opts, machine_line(servers, vers, opts))
            for failure in failures:
                print(f"\nFAILED: {failure.splitlines()[0]}")
            if opts.json:
                payload = {"args": vars(opts), "runs": runs, "medians": med, "labels": labels}
                payload["failures"] = failures
                payload["versions"] = vers
                Path(opts.json).write_text(json.dumps(payload, indent=2, default=str))
        finally:
            await admin.close()
    progress(f"done in {time.monotonic() - started:.0f} s")


async def fill_template(servers: Servers, workflows: int) -> None:
    """The template the ``@filled`` rows copy: the runtime's schema, migrated, holding
    ``workflows`` finished workflows and their history (benchmarks/history.py)."""
    from benchmarks import history  # the repository's, as the runtime peer's root is
    from orchestrator.store.migrations import migrate

    started = time.monotonic()
    progress(f"filling a template with {workflows:,} finished workflows ...")
    await sql_name(servers, DROP_DB, FILLED_DB)
    await sql_name(servers, CREATE_DB, FILLED_DB)
    owner = await asyncpg.connect(
        servers.url(FILLED_DB), server_settings={"search_path": f"{FILLED_SCHEMA},public"}
    )
    try:
        await owner.execute(await owner.fetchval(CREATE_SCHEMA, FILLED_SCHEMA))
        await migrate(owner)
        await history.fill(owner, workflows, log=None)
    finally:
        await owner.close()
    progress(f"  filled in {time.monotonic() - started:.0f} s")


def summary(run: dict[str, Any]) -> str:
    return (
        f"{run['wf_per_s']:.0f} wf/s, p50 {run['p50_ms']:.1f} ms, p99 {run['p99_ms']:.1f} ms, "
        f"worker CPU {run['worker_cpu_ms']:.2f} ms/wf, commits {run['pg_commits']:.2f} "
        f"(writes {run['pg_writes']:.2f}, in the WAL {run['wal_commits']:.2f}), "
        f"WAL {run['wal_kib']:.2f} KiB/wf, "
        f"PG CPU {run['pg_cpu_ms']:.2f} ms/wf, Redis CPU {run['redis_cpu_ms']:.2f} ms/wf, "
        f"steal {run['steal_pct']:.1f} %, others {run['others_pct']:.1f} %, "
        f"load {run['load1']:.2f}"
        + (" NOISY" if run["noisy"] else "")
        + (f" ({run['note']})" if run["note"] else "")
    )


def print_report(
    systems: list[System],
    runs: list[dict[str, Any]],
    med: dict[str, dict[str, float]],
    labels: dict[str, str],
    opts: argparse.Namespace,
    machine: str,
) -> None:
    print(
        f"`python benchmarks/compare.py {' '.join(sys.argv[1:])}`: {opts.reps} interleaved "
        f"round(s); each cell is the median of a row's runs (min{DASH}max of all of them); "
        f"noisy runs (CPU steal > {STEAL_NOISY_PCT:g} % or other processes > "
        f"{OTHERS_NOISY_PCT:g} % of the machine) are left out of the median while the row "
        f"has a clean one{' (not here: --keep-noisy)' if opts.keep_noisy else ''}.\n"
    )
    print("\n".join(table(systems, runs, opts, labels, COLUMNS)))
    print("\nServer CPU and noise over the same throughput phase:\n")
    print("\n".join(table(systems, runs, opts, labels, EXTRA_COLUMNS)))
    lines = ratios(systems, med)
    if lines:
        print("\nRatios (medians):\n")
        print("\n".join(lines))
    print(f"\n{machine}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--workflows", type=int, default=2000, help="throughput: all at once")
    parser.add_argument("--latency", type=int, default=200, help="one at a time")
    parser.add_argument("--warmup", type=int, default=100, help="a batch before all else")
    parser.add_argument("--latency-warmup", type=int, default=20)
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS, help="comma-separated")
    parser.add_argument(
        "--processes", help="the runtime's worker-process rows, e.g. 1,2,4 (default: runtime-2)"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="in flight per worker")
    parser.add_argument("--runtime-root", type=Path, default=REPO_ROOT, help="its checkout")
    parser.add_argument("--settle", type=float, default=10.5, help="s before the 1st snapshot")
    parser.add_argument("--timeout", type=float, default=600, help="s for one phase")
    parser.add_argument("--keep-noisy", action="store_true", help="medians over every run")
    parser.add_argument("--json", help="write every run and the medians here")
    parser.add_argument(
        "--fill",
        type=int,
        default=1_000_000,
        help="finished workflows in the tables of the runtime's @filled rows",
    )
    opts = parser.parse_args()
    opts.runtime_root = opts.runtime_root.resolve()
    processes = [int(n) for n in opts.processes.split(",")] if opts.processes else None
    systems = systems_for([k.strip() for k in opts.systems.split(",") if k.strip()], processes)
    for name in sorted({s.venv for s in systems if s.venv is not None}):
        ensure_venv(name)
    if any(s.script == "runtime_peer.py" for s in systems):
        check_runtime_root(opts.runtime_root)
    asyncio.run(bench(opts, systems))


if __name__ == "__main__":
    main()
