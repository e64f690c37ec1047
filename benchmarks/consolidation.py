"""Benchmark: consolidation throughput and lag.

Builds a backlog of N completed workflows of a one-agent pipeline that consolidates
(the worker runs with consolidation off, so the entries wait in the stream), then
starts C consolidator tasks and measures how fast they drain it: workflows/s, and
the lag sampled over time (stream entries not yet consolidated; age of the oldest
completed-but-unconsolidated workflow, from Postgres). Customers repeat, state
preferences and change them, so the memory gate merges and updates as well as adds.
Embedded Redis and Postgres unless REDIS_URL / DATABASE_URL are set; the offline
distiller and the lexical embedder.

    python benchmarks/consolidation.py --workflows 2000 --consolidators 1 2
"""

from __future__ import annotations

import argparse
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import anyio
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.coordination import consolidation as queue
from orchestrator.engine.consolidator import Consolidator, lag
from orchestrator.engine.worker import Worker
from orchestrator.runtime import open_runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext

DROP = "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)"
BODIES = (
    "My order number is {n}. I prefer to be contacted by email.",
    "The parcel never came. Please never call me at work.",
    "I prefer to be contacted by phone. The invoice total is wrong.",
    "I'm allergic to peanuts. Please always include the receipt.",
    "My plan is the premium one. I think I prefer mornings.",
)


class Note(BaseModel):
    """The benchmark input: a customer's short note."""

    customer_id: str
    subject: str
    body: str


class NoteIn(AgentInput):
    input: Note


class Reply(AgentOutput):
    text: str


def notes_app() -> App:
    """One agent that answers a note; its pipeline consolidates."""
    app = App("consolidation-bench")

    @app.agent
    class Answer(Agent[NoteIn, Reply]):
        name = "answer"
        input_model = NoteIn
        output_model = Reply

        async def run(self, ctx: StepContext, data: NoteIn) -> Reply:
            text = f"We sorted out {data.input.subject.lower()}. Thanks for your patience."
            ctx.say(text)
            return Reply(text=text)

    app.pipeline("notes", ["answer"], input_model=Note, consolidate=True)
    return app


@dataclass
class Measured:
    """One run: how many workflows, how fast they were consolidated, and the lag seen."""

    workflows: int
    consolidators: int
    backlog_seconds: float  # building the backlog (submit and run the workflows)
    seconds: float  # draining it
    samples: list[tuple[float, int, float | None]] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        """Workflows consolidated per second."""
        return self.workflows / self.seconds


async def measure(
    settings: Settings, *, workflows: int = 2000, consolidators: int = 1, customers: int = 200
) -> Measured:
    """Consolidate a backlog of ``workflows`` completed workflows with ``consolidators``
    tasks on a fresh schema and key prefix (removed afterwards)."""
    async with open_runtime(settings, notes_app()) as rt:
        try:
            client = Client(rt)
            start = time.perf_counter()
            limiter = anyio.CapacityLimiter(16)

            async def submit(i: int) -> None:
                note = Note(
                    customer_id=f"customer-{i % customers}",
                    subject=f"Ticket {i}",
                    body=BODIES[(i // customers) % len(BODIES)].format(n=i),
                )
                async with limiter:
                    await client.submit("notes", note, tenant=f"tenant-{i % 4}")

            async with anyio.create_task_group() as tg:
                for i in range(workflows):
                    tg.start_soon(submit, i)
            await Worker(rt, concurrency=32, reconcile=False, consolidate=False).run_until_idle(
                timeout=600
            )
            built = time.perf_counter()
            result = Measured(workflows, consolidators, built - start, 0.0)
            await queue.ensure_group(rt.redis, rt.keys)
            stop = anyio.Event()
            tasks = [Consolidator(rt, f"bench-{n}", count=32) for n in range(consolidators)]
            async with anyio.create_task_group() as tg:
                began = time.perf_counter()
                for task in tasks:
                    tg.start_soon(task.run, stop)
                next_sample = began
                while sum(t.consolidated for t in tasks) < workflows:
                    if time.perf_counter() >= next_sample:
                        next_sample += 0.5
                        now = await lag(rt)
                        result.samples.append(
                            (time.perf_counter() - began, now.stream_lag, now.oldest_seconds)
                        )
                    await anyio.sleep(0.01)
                result.seconds = time.perf_counter() - began
                stop.set()
            return result
        finally:
            async with rt.pool.acquire() as conn:
                await conn.execute("RESET ROLE")  # the owner drops the schema
                await conn.execute(await conn.fetchval(DROP, settings.db_schema))
            keys = [k async for k in rt.redis.scan_iter(match=f"{settings.key_prefix}:*")]
            if keys:
                await rt.redis.delete(*keys)


def report(m: Measured) -> str:
    """The figures of one run, with the lag over time (about one sample a second)."""
    lines = [
        f"consolidators={m.consolidators} workflows={m.workflows} "
        f"backlog_built_in={m.backlog_seconds:.1f}s drained_in={m.seconds:.2f}s "
        f"throughput={m.per_second:.1f} workflows/s "
        f"max_stream_lag={max((s[1] for s in m.samples), default=0)} "
        f"max_oldest_unconsolidated={max((s[2] or 0 for s in m.samples), default=0):.1f}s"
    ]
    lines += [
        f"  t={t:5.1f}s stream_lag={depth:5d} oldest_unconsolidated="
        + (f"{age:.1f}s" if age is not None else "-")
        for t, depth, age in m.samples[::2]
    ]
    return "\n".join(lines)


async def bench(args: argparse.Namespace) -> list[Measured]:
    results = []
    for count in args.consolidators:
        suffix = secrets.token_hex(3)
        settings = Settings(
            key_prefix=f"bench-{suffix}", db_schema=f"bench_{suffix}", pool_size=20, block_ms=100
        )
        results.append(
            await measure(
                settings,
                workflows=args.workflows,
                consolidators=count,
                customers=args.customers,
            )
        )
        print(report(results[-1]), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--workflows", type=int, default=2000)
    parser.add_argument("--customers", type=int, default=200)
    parser.add_argument("--consolidators", type=int, nargs="+", default=[1, 2])
    args: Any = parser.parse_args()
    anyio.run(bench, args)


if __name__ == "__main__":
    main()
