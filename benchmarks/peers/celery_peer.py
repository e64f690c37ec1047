"""compare.py peer: Celery (its own venv), Redis as broker and result backend.

A chain of three tasks (triage -> research -> response; research calls the no-op
tool), ``task_acks_late``; nothing is stored in Postgres. The worker is a separate
``celery worker`` process with Celery's defaults (the prefork pool, one child per
core: ``--worker-processes``); the client here calls ``chain(...).apply_async()``
for every workflow, then ``get()`` on each result.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import common
from celery import Celery, chain
from celery.exceptions import TimeoutError as GetTimeout

REDIS_URL = os.environ.get("COMPARE_CELERY_REDIS", "redis://127.0.0.1:6379/0")
app = Celery("compare", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(task_acks_late=True, worker_hijack_root_logger=False)


@app.task(name="triage")  # one name in this script and in the worker
def triage(t: dict[str, Any]) -> dict[str, Any]:
    return {"ticket": t, "triage": common.triage(t)}


@app.task(name="research")  # one name in this script and in the worker
def research(state: dict[str, Any]) -> dict[str, Any]:
    t = state["ticket"]
    found = common.noop(t["subject"])
    return {**state, "research": common.research(t, state["triage"], found)}


@app.task(name="response")  # one name in this script and in the worker
def response(state: dict[str, Any]) -> dict[str, Any]:
    return common.response(state["ticket"], state["triage"], state["research"])


# get() on the Redis result backend now and then misses the Pub/Sub message of a result
# that is stored (seen: one in ~7,000, then it waits forever); a get() that times out
# re-reads the stored result first. How often that happened is reported.
GET_TIMEOUT = 1.0
missed = [0]


def result_of(r: Any) -> Any:
    for _ in range(600):
        try:
            return r.get(timeout=GET_TIMEOUT)
        except GetTimeout:
            if r.ready():
                missed[0] += 1
    raise TimeoutError(f"no result for {r.id}")


def workflow(i: int) -> Any:
    return chain(triage.s(common.ticket(i)), research.s(), response.s()).apply_async()


async def main(args: Any) -> None:
    here = Path(__file__).resolve().parent
    cmd = [sys.executable, "-m", "celery", "-A", "celery_peer", "worker", "--loglevel", "WARNING"]
    worker = subprocess.Popen(
        [*cmd, "--concurrency", str(args.worker_processes)],
        cwd=here,
        stdin=subprocess.DEVNULL,
        stdout=sys.stderr,
    )

    async def batch(n: int, first: int) -> int:
        results = [workflow(i) for i in range(first, first + n)]
        return sum("reply" in result_of(r) for r in results)

    async def one(i: int) -> None:
        assert "reply" in result_of(workflow(i))

    try:
        note = lambda: f"{missed[0]} result messages missed" if missed[0] else ""  # noqa: E731
        await common.drive(args, batch, one, [worker.pid], note)
    finally:
        worker.send_signal(signal.SIGTERM)  # warm shutdown
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--worker-processes", type=int, default=os.cpu_count() or 2)
    opts = p.parse_args()
    os.environ["COMPARE_CELERY_REDIS"] = opts.redis_url  # the worker process reads it
    app.conf.update(broker_url=opts.redis_url, result_backend=opts.redis_url)
    asyncio.run(main(opts))
