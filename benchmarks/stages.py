"""Benchmark: where one workflow's latency goes, stage by stage.

Runs the noop pipeline (three steps) one workflow at a time with in-process workers,
as ``benchmarks/wait_latency.py`` does, and stamps the start and end of each stage
of each workflow: the submit, and per step the delivery (``process``), the lease, the
agent, the completion and the handoff, then ``Client.wait``'s reads (``terminal``).
Prints each stamp's median, in ms from the submit's start, in time order (a stage's
``>`` is its start, ``<`` its end; ``lease 2`` is step 2's), then the slowest
workflows with the gaps between stamps that were longer than usual: what the tail
(p99) is made of.

The stamps wrap the store's and the step runner's methods (private ones included) in
this process only, so a renamed method fails here at once.

    python benchmarks/stages.py --workflows 200
"""

from __future__ import annotations

import argparse
import itertools
import secrets
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from pipeline import noop_app

from orchestrator.client import Client
from orchestrator.engine.protocol import StepRunner
from orchestrator.engine.worker import Worker
from orchestrator.runtime import open_runtime
from orchestrator.settings import Settings
from orchestrator.store.operations import Store

DROP = "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)"
# (class, method, stage): each call of the method is one stage of a workflow.
STAGES: list[tuple[type, str, str]] = [
    (Store, "submit", "submit"),
    (StepRunner, "process", "process"),
    (StepRunner, "_lease", "lease"),
    (StepRunner, "_execute", "agent"),
    (Store, "complete", "complete"),
    (StepRunner, "_hand_off", "handoff"),
    (Store, "terminal", "terminal"),
]

stamps: list[tuple[str, float]] = []


def _stamped(method: Callable[..., Awaitable[Any]], stage: str) -> Callable[..., Any]:
    async def stamped(*args: Any, **kwargs: Any) -> Any:
        stamps.append((f"{stage}>", time.perf_counter()))
        try:
            return await method(*args, **kwargs)
        finally:
            stamps.append((f"{stage}<", time.perf_counter()))

    return stamped


async def bench(args: argparse.Namespace) -> None:
    for owner, name, stage in STAGES:
        setattr(owner, name, _stamped(getattr(owner, name), stage))
    suffix = secrets.token_hex(3)
    settings = Settings(key_prefix=f"bench-{suffix}", db_schema=f"bench_{suffix}", block_ms=100)
    rows: dict[str, list[float]] = defaultdict(list)
    async with open_runtime(settings, noop_app()) as runtime:
        try:
            client, worker = Client(runtime), Worker(runtime, concurrency=8)
            async with anyio.create_task_group() as tg:
                tg.start_soon(worker.run)
                await anyio.sleep(0.3)  # let the consumer groups exist
                for i in range(args.warmup + args.workflows):
                    stamps.clear()
                    start = time.perf_counter()
                    wid = await client.submit(None, {"n": i})
                    await client.wait([wid], timeout=30)
                    if i < args.warmup:
                        continue
                    seen: Counter[str] = Counter()
                    for label, at in stamps:
                        seen[label] += 1
                        rows[f"{label[:-1]} {seen[label]}{label[-1]}"].append((at - start) * 1000)
                    rows["end"].append((time.perf_counter() - start) * 1000)
                worker.stop()
        finally:
            async with runtime.db() as conn:
                await conn.execute("RESET ROLE")  # the owner drops the schema
                await conn.execute(await conn.fetchval(DROP, settings.db_schema))
    _report(rows, args.slowest)


def _report(rows: dict[str, list[float]], slowest: int) -> None:
    ends = rows["end"]
    # Only stamps every workflow has (a stage that ran once in a while is not comparable).
    common = {k: v for k, v in rows.items() if len(v) == len(ends)}
    median = {k: statistics.median(v) for k, v in common.items()}
    order = sorted(common, key=median.__getitem__)
    print(f"workflows={len(ends)}; median ms from the submit's start:")
    for key in order:
        print(f"  {median[key]:7.2f}  {key}")
    # Between consecutive stamps (in median order): where a slow workflow lost its time.
    gaps = {
        b: [y - x for x, y in zip(common[a], common[b], strict=True)]
        for a, b in itertools.pairwise(order)
    }
    usual = {k: statistics.median(v) for k, v in gaps.items()}
    before = {b: a for a, b in itertools.pairwise(order)}
    print("slowest (each gap between two stamps longer than its median by over 0.5 ms):")
    for i in sorted(range(len(ends)), key=lambda i: -ends[i])[:slowest]:
        late = [
            f"{before[k]} -> {k} +{gaps[k][i] - usual[k]:.1f}"
            for k in order[1:]
            if gaps[k][i] - usual[k] > 0.5
        ]
        print(f"  {ends[i]:.1f} ms: " + ", ".join(late))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workflows", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--slowest", type=int, default=5, help="workflows shown of the tail")
    anyio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
