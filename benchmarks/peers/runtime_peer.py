"""compare.py peer: this runtime (run with the runtime's venv, PYTHONPATH = the checkout).

The ticket workflow is a pipeline of three agents (triage, research, response);
research calls the registered no-op tool through ``ctx.tool`` (the tool ledger).
``--processes 0`` runs the Worker in this (the client's) process; N > 0 starts N
subprocesses of this script with ``--worker``, each running ``Worker(runtime).run()``
with the same settings, and the client stays here.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
from typing import Any

import anyio
import common
from pydantic import BaseModel, ConfigDict

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext


class Ticket(BaseModel):
    model_config = ConfigDict(frozen=True)
    subject: str
    body: str
    customer: str


class Triage(AgentOutput):
    category: str
    priority: str


class Research(AgentOutput):
    article: str
    category: str


class Reply(AgentOutput):
    reply: str


class TriageIn(AgentInput):
    ticket: Ticket


class ResearchIn(TriageIn):
    triage: Triage


class ResponseIn(ResearchIn):
    research: Research


def ticket_app() -> App:
    app = App("compare")

    @app.tool
    async def noop(query: str) -> dict[str, Any]:
        return await common.noop_tool(query)

    @app.agent
    class TriageAgent(Agent[TriageIn, Triage]):
        name = "triage"
        input_model = TriageIn
        output_model = Triage

        async def run(self, ctx: StepContext, data: TriageIn) -> Triage:
            return Triage(**common.triage(data.ticket.model_dump()))

    @app.agent
    class ResearchAgent(Agent[ResearchIn, Research]):
        name = "research"
        input_model = ResearchIn
        output_model = Research

        async def run(self, ctx: StepContext, data: ResearchIn) -> Research:
            found = await ctx.tool("noop", query=data.ticket.subject)
            t, tri = data.ticket.model_dump(), data.triage.model_dump()
            return Research(**common.research(t, tri, found))

    @app.agent
    class ResponseAgent(Agent[ResponseIn, Reply]):
        name = "response"
        input_model = ResponseIn
        output_model = Reply

        async def run(self, ctx: StepContext, data: ResponseIn) -> Reply:
            t = data.ticket.model_dump()
            out = common.response(t, data.triage.model_dump(), data.research.model_dump())
            return Reply(**out)

    app.pipeline(
        "ticket", ["triage", "research", "response"], input_model=Ticket, input_key="ticket"
    )
    return app


def settings(args: Any) -> Settings:
    # The same knobs as benchmarks/pipeline.py, for 1 and N processes alike.
    return Settings(
        redis_url=args.redis_url,
        database_url=args.database_url,
        key_prefix=args.prefix,
        db_schema=args.prefix.replace("-", "_"),
        pool_size=args.pool,
        block_ms=100,
        openai_api_key=None,
    )


async def worker_main(args: Any) -> None:
    async with open_runtime(settings(args), ticket_app()) as runtime:
        worker = Worker(runtime, concurrency=args.concurrency)
        async with anyio.create_task_group() as tg:

            async def stop_on_term() -> None:
                with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                    async for _ in signals:
                        worker.stop()
                        return

            tg.start_soon(stop_on_term)
            await worker.run()
            tg.cancel_scope.cancel()


def start_workers(args: Any) -> list[subprocess.Popen[bytes]]:
    cmd = [sys.executable, __file__, "--worker", "--prefix", args.prefix, "--pool", str(args.pool)]
    cmd += ["--redis-url", args.redis_url, "--database-url", args.database_url]
    cmd += ["--concurrency", str(args.concurrency)]
    return [subprocess.Popen(cmd, stdin=subprocess.DEVNULL) for _ in range(args.processes)]


async def client_main(args: Any) -> None:
    # Migrate once here before any worker starts (workers would race to create the schema).
    async with open_runtime(settings(args), ticket_app()) as runtime:
        procs = start_workers(args) if args.processes else []
        try:
            await drive(args, runtime, procs)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    await asyncio.to_thread(p.wait, 30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


async def drive(args: Any, runtime: Runtime, procs: list[subprocess.Popen[bytes]]) -> None:
    client = Client(runtime)
    limiter = anyio.CapacityLimiter(args.submitters)

    async def batch(n: int, first: int) -> int:
        ids = []

        async def submit(i: int) -> None:
            async with limiter:
                ids.append(await client.submit("ticket", common.ticket(i)))

        async with anyio.create_task_group() as tg:
            for i in range(first, first + n):
                tg.start_soon(submit, i)
        statuses = await client.wait(ids, timeout=600)
        return sum(s.value == "completed" for s in statuses.values())

    async def one(i: int) -> None:
        wid = await client.submit("ticket", common.ticket(i))
        status = (await client.wait([wid], timeout=60))[wid]
        if status.value != "completed":
            raise RuntimeError(f"workflow {wid} ended {status.value}")

    async def run(worker: Worker | None) -> None:
        pids = [p.pid for p in procs] if procs else [os.getpid()]
        try:
            await common.drive(args, batch, one, pids)
        finally:
            if worker is not None:
                worker.stop()

    if procs:
        await anyio.sleep(1.0)  # let the worker processes connect and create their groups
        await run(None)
        return
    worker = Worker(runtime, concurrency=args.concurrency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await anyio.sleep(0.2)  # let the consumer groups exist
        await run(worker)


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help="(internal) be one worker process")
    p.add_argument("--prefix", default=f"cmp-{secrets.token_hex(3)}")
    p.add_argument("--pool", type=int, default=20, help="Postgres pool size per process")
    p.add_argument("--submitters", type=int, default=16, help="concurrent submits")
    args = p.parse_args()
    anyio.run(worker_main if args.worker else client_main, args)


if __name__ == "__main__":
    main()
