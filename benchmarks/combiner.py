"""Benchmark: the CPU a ``Combiner`` (group commit) costs per call, by callers at once.

Callers each make calls in turn through one combiner whose batch function takes
0.5 ms (a round trip); reported is the process's CPU time per call. 2,000 callers
at once is the benchmark's "2,000 workflows submitted at once": their Redis
commands share ``coordination.pipelining``'s combiner.

    python benchmarks/combiner.py --callers 32,256,2000 --calls 20000
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import anyio

from orchestrator.batching import Combiner


async def _round_trip(items: Sequence[int]) -> list[int]:
    await anyio.sleep(0.0005)
    return list(items)


async def cpu_per_call(callers: int, calls: int, max_batch: int) -> float:
    """Seconds of CPU per call with ``callers`` at once, ``calls`` in all."""
    combine: Combiner[int, int] = Combiner(_round_trip, max_batch=max_batch)
    each = max(1, calls // callers)

    async def caller() -> None:
        for _ in range(each):
            await combine(1)

    start = time.process_time()
    async with anyio.create_task_group() as tg:
        for _ in range(callers):
            tg.start_soon(caller)
    return (time.process_time() - start) / (callers * each)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", default="32,256,2000", help="comma-separated")
    parser.add_argument("--calls", type=int, default=20_000, help="in all, per row")
    parser.add_argument("--max-batch", type=int, default=64)
    opts = parser.parse_args()
    print("| callers at once | CPU µs/call |\n|---|---|")
    for callers in (int(c) for c in opts.callers.split(",")):
        cpu = anyio.run(cpu_per_call, callers, opts.calls, opts.max_batch)
        print(f"| {callers} | {cpu * 1e6:.1f} |")


if __name__ == "__main__":
    main()
