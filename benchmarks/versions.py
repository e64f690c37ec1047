"""Benchmark: benchmarks/pipeline.py on two checkouts, interleaved, on the same private servers.

Starts a private Redis and Postgres (tests/fault/servers.py), then runs
``python benchmarks/pipeline.py ARGS`` alternately from the ``--before`` checkout
and this one (each with its own code: cwd and PYTHONPATH set to the checkout),
``--runs`` times each, and prints every run and the medians of workflows/s,
p50/p99 latency and Postgres transactions per workflow.

    git worktree add /tmp/before fa8db1a
    PYTHONPATH=. python benchmarks/versions.py --before /tmp/before --runs 2 \\
        -- --tickets 1000 --concurrency 32 --app noop
    git worktree remove --force /tmp/before
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

from tests.fault.servers import PostgresServer, RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
METRICS = {
    "workflows/s": "workflows/s",
    "p50": "p50 ms",
    "p99": "p99 ms",
    "pg_writes/workflow": "pg_writes/wf",
    "pg_xacts/workflow": "pg_xacts/wf",
}


def env_for(root: Path, urls: tuple[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_")}
    env.update(PYTHONPATH=str(root), REDIS_URL=urls[0], DATABASE_URL=urls[1], OPENAI_API_KEY="")
    return env


def run(label: str, root: Path, urls: tuple[str, str], args: list[str]) -> dict[str, float]:
    cmd = [sys.executable, "benchmarks/pipeline.py", *args]
    done = subprocess.run(
        cmd, cwd=root, env=env_for(root, urls), capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"{root}: {' '.join(cmd)} exited {done.returncode}:\n{done.stderr}")
    line = done.stdout.strip().splitlines()[-1]
    print(f"  {label}: {line}", file=sys.stderr, flush=True)
    fields = dict(re.findall(r"(\S+)=(\S+)", line))
    return {name: float(re.sub(r"[a-z]+$", "", fields[name])) for name in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("pipeline_args", nargs=argparse.REMAINDER, help="after --")
    opts = parser.parse_args()
    args = [a for a in opts.pipeline_args if a != "--"]
    roots = {"before": opts.before.resolve(), "after": REPO_ROOT}
    results: dict[str, list[dict[str, float]]] = {label: [] for label in roots}
    with RedisServer() as redis, PostgresServer() as pg:
        urls = (redis.url, pg.url)
        for label, root in roots.items():
            check = [sys.executable, "-c", "import orchestrator; print(orchestrator.__file__)"]
            where = subprocess.run(
                check, cwd=root, env=env_for(root, urls), capture_output=True, text=True
            )
            print(f"{label}: {where.stdout.strip()}", file=sys.stderr)
        for _ in range(opts.runs):
            for label, root in roots.items():
                results[label].append(run(label, root, urls, args))
    print(f"pipeline.py {' '.join(args)}; before = {roots['before']}, after = {REPO_ROOT}\n")
    print("| version | run | " + " | ".join(METRICS.values()) + " |")
    print("|---" * (len(METRICS) + 2) + "|")
    for label, runs in results.items():
        for i, r in enumerate(runs, 1):
            print(f"| {label} | {i} | " + " | ".join(f"{r[m]:g}" for m in METRICS) + " |")
    medians = {
        label: {m: statistics.median(r[m] for r in runs) for m in METRICS}
        for label, runs in results.items()
    }
    for label, m in medians.items():
        print(f"| {label} | median | " + " | ".join(f"{m[k]:.2f}" for k in METRICS) + " |")
    change = [
        (medians["after"][k] - medians["before"][k]) / medians["before"][k] * 100 for k in METRICS
    ]
    print("| after vs before | | " + " | ".join(f"{c:+.0f}%" for c in change) + " |")


if __name__ == "__main__":
    main()
