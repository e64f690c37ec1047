"""Crash and resume: a worker is killed in the middle of a ticket; another finishes it.

Worker A is started with a crash point that SIGKILLs it inside the research
step, after its second tool call; the triage step before it is already
checkpointed in Postgres. Worker B then reclaims the ticket once A's lease
lapses and finishes it from that checkpoint: triage is not run again.

    python examples/crash_and_resume.py

Uses REDIS_URL / DATABASE_URL when set, else the embedded servers.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio

from orchestrator.agents.support import app
from orchestrator.agents.ticket import Ticket
from orchestrator.client import Client
from orchestrator.embedded import embedded_postgres, embedded_redis
from orchestrator.runtime import open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
TICKET = Ticket(
    tenant_id="acme",
    customer_id="cus_1004",
    subject="Charged twice",
    body="Order ORD-10007 was charged twice on my card ending 5100.",
)


def start_worker(env: dict[str, str], **extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", "--concurrency", "2"],
        env={**env, **extra},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def main() -> int:
    base = Settings()
    with (
        tempfile.TemporaryDirectory(prefix="crash-and-resume-") as tmp,
        contextlib.ExitStack() as servers,
    ):
        redis_url = base.redis_url or servers.enter_context(embedded_redis(Path(tmp) / "r"))
        db_url = base.database_url or servers.enter_context(embedded_postgres(base.home / "pg"))
        settings = base.model_copy(
            update={
                "redis_url": redis_url,
                "database_url": db_url,
                "lease_seconds": 2.0,
                "key_prefix": f"crash-demo-{os.getpid()}",
            }
        )
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": db_url,
            "ORCHESTRATOR_LEASE_SECONDS": "2",
            "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
            "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
            "PYTHONPATH": str(ROOT),
        }
        async with open_runtime(settings, app) as runtime:
            client = Client(runtime)
            worker_a = start_worker(
                env, ORCHESTRATOR_CRASH_AT="after_tool_effect", ORCHESTRATOR_CRASH_AFTER="2"
            )
            wid = await client.submit(None, TICKET)
            print(f"submitted {wid}; worker A (pid {worker_a.pid}) will die inside research")
            code = await anyio.to_thread.run_sync(worker_a.wait)
            print(f"worker A exited with {code} (-9 = SIGKILL) in the middle of the ticket")
            done = [s.agent for s in (await client.get(wid)).steps if s.status == "completed"]
            print(f"checkpointed in Postgres so far: {done}")
            started = time.monotonic()
            worker_b = start_worker(env)
            try:
                statuses = await client.wait([wid], timeout=60)
            finally:
                worker_b.terminate()
                worker_b.wait()
            record = await client.get(wid)
            print(
                f"worker B finished it in {time.monotonic() - started:.1f}s: {statuses[wid].value}"
            )
            for step in record.steps:
                print(
                    f"  step {step.seq} {step.agent:<9} {step.status.value:<10} "
                    f"attempt {step.attempt}"
                )
            async with runtime.pool.acquire() as conn:
                runs = await conn.fetchval(
                    "SELECT count(*) FROM step_attempts a JOIN steps s ON s.id = a.step_id "
                    "WHERE s.workflow_id = $1 AND s.agent = 'triage'",
                    wid,
                )
            print(f"triage ran {runs} time(s): the ticket resumed from its checkpoint")
            ok = statuses[wid] is WorkflowStatus.COMPLETED and code == -9 and runs == 1
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(anyio.run(main))
