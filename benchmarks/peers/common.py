"""What every peer driver shares (standard library only: each peer runs in its own venv).

The protocol with benchmarks/compare.py, over the peer's stdin and stdout:

1. the peer sets up, runs a warm-up batch, then the latency phase (its own warm-up, then
   one workflow at a time), prints ``LATENCY {json}`` and ``READY``, and waits for a line;
2. compare.py lets Postgres's statistics settle, snapshots its counters and sends ``GO``;
3. the peer runs the throughput phase, prints ``THROUGHPUT {json}``, closes its connections
   and exits 0; compare.py snapshots again once the peer's backends are gone (a backend
   flushes its statistics when it exits, so the second snapshot is exact).

Anything else a peer prints goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

TICKS = os.sysconf("SC_CLK_TCK")
SUBJECTS = ("Refund for order 1042", "Password reset", "Package arrived damaged", "Invoice VAT")


def ticket(i: int) -> dict[str, str]:
    """The small input every system gets."""
    return {
        "subject": SUBJECTS[i % len(SUBJECTS)],
        "body": f"Hello, this is ticket {i}. Please help me with this as soon as you can.",
        "customer": f"cust-{i % 97}",
    }


# The three stub agents and the tool, in plain Python so every peer computes the same thing.
def triage(t: dict[str, Any]) -> dict[str, Any]:
    subject = str(t["subject"]).lower()
    category = "billing" if "refund" in subject or "invoice" in subject else "general"
    return {"category": category, "priority": "high" if "damaged" in subject else "normal"}


def research(t: dict[str, Any], tri: dict[str, Any], found: dict[str, Any]) -> dict[str, Any]:
    return {"article": found["article"], "category": tri["category"]}


def response(t: dict[str, Any], tri: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    return {"reply": f"Re: {t['subject']} ({tri['priority']}): see article {res['article']}."}


def noop(query: str) -> dict[str, Any]:
    """The one no-op tool call per workflow (in the research step); Celery's tasks are
    synchronous, so they call this directly."""
    return {"article": f"kb-{len(query) % 10}"}


async def noop_tool(query: str) -> dict[str, Any]:
    return noop(query)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--database-url", required=True)
    p.add_argument("--workflows", type=int, default=2000, help="throughput phase, all at once")
    p.add_argument("--warmup", type=int, default=100, help="all at once, before READY")
    p.add_argument("--latency-n", type=int, default=200, help="one at a time")
    p.add_argument("--latency-warmup", type=int, default=20)
    p.add_argument("--processes", type=int, default=0, help="worker processes (0: in process)")
    p.add_argument("--concurrency", type=int, default=32, help="in flight per worker")
    # compare.py sends SIGUSR1 to a peer that hangs: its stacks go to its log.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return p


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def emit(tag: str, payload: dict[str, Any] | None = None) -> None:
    line = tag if payload is None else f"{tag} {json.dumps(payload)}"
    print(line, flush=True)


def wait_go() -> None:
    """Block until compare.py sends a line; EOF means it gave up: exit."""
    if not sys.stdin.readline():
        raise SystemExit("compare.py went away")


def _stat_fields(pid: int) -> list[str]:
    # Fields after the parenthesised command name (which may contain spaces).
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int(_stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(roots: Iterable[int]) -> float:
    """utime + stime of the roots and their live descendants, plus what their reaped
    children used (cutime + cstime)."""
    total = 0
    for root in roots:
        for pid in descendants(root):
            try:
                f = _stat_fields(pid)
            except (OSError, IndexError):
                continue  # exited meanwhile
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / TICKS


def latency_summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)
    return {
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "mean_ms": statistics.fmean(ms),
        "n": len(ms),
    }


Batch = Callable[[int, int], Awaitable[int]]  # (count, first index) -> completed
One = Callable[[int], Awaitable[None]]  # index -> returns once that workflow is done


async def drive(
    args: argparse.Namespace,
    batch: Batch,
    one: One,
    worker_pids: list[int],
    note: Callable[[], str] = str,
) -> None:
    """Warm up, the latency phase, then the throughput phase (CPU of ``worker_pids`` and
    their children measured around it), talking the protocol above. ``note()`` is
    anything the peer has to say about the run (reported with it)."""
    await batch(args.warmup, 10_000_000)
    samples = []
    for i in range(args.latency_warmup + args.latency_n):
        t0 = time.perf_counter()
        await one(20_000_000 + i)
        if i >= args.latency_warmup:
            samples.append(time.perf_counter() - t0)
    emit("LATENCY", latency_summary(samples))
    emit("READY")
    await asyncio.to_thread(wait_go)
    cpu0, start = cpu_seconds(worker_pids), time.perf_counter()
    completed = await batch(args.workflows, 0)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds(worker_pids) - cpu0
    emit(
        "THROUGHPUT",
        {
            "workflows": args.workflows,
            "completed": completed,
            "seconds": seconds,
            "wf_per_s": completed / seconds,
            "worker_cpu_s": cpu,
            "note": note(),
        },
    )
