"""The ``orchestrator`` command line.

Every failure is one line on stderr and a non-zero exit; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import anyio
import typer
from pydantic import ValidationError
from rich.table import Table

from orchestrator.app import Pipeline
from orchestrator.cli.budget import budget
from orchestrator.cli.demo import load_inputs, returning_inputs, run_local
from orchestrator.cli.dlq import dlq
from orchestrator.cli.render import (
    print_summary,
    recognition_line,
    steps_table,
    usd,
    workflow_panel,
)
from orchestrator.cli.show import show
from orchestrator.cli.support import Options, err, guard, out, run_body, workflow_id_arg
from orchestrator.client import Client
from orchestrator.connections import redis_errors
from orchestrator.engine.worker import Worker
from orchestrator.errors import ConfigurationError, InvalidInput, ServiceUnavailable
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.store.erasure import Erasure, ErasureStore, refuse_unfinished
from orchestrator.store.workflows import RunOrder

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Durable multi-agent workflows on Redis and Postgres.",
)


@cli.callback()
@guard
def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option("--app", help="module:attr of the App")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Read the settings and set up logging before any command; the commands find the
    Options on ``ctx.obj``."""
    opts = Options(app)
    level = (
        logging.DEBUG
        if debug
        else getattr(logging, opts.settings.log_level.upper(), logging.WARNING)
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = opts


@cli.command()
@guard
def demo(
    ctx: typer.Context,
    tickets: Annotated[Path | None, typer.Option(help="JSON file of tickets")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Run the support pipeline end to end on the sample tickets."""
    pipeline = ctx.obj.app().resolve_pipeline(None)
    batch = load_inputs(pipeline, tickets)

    # The sample tickets come with follow-ups of two of their customers: run once the
    # first batch is in long-term memory, they show returning customers recognised.
    then = returning_inputs(pipeline) if tickets is None and pipeline.consolidate else []

    async def body(runtime: Runtime) -> None:
        err.print(f"model: {runtime.model.name}")
        report = await run_local(
            runtime, batch, pipeline=pipeline.name, concurrency=concurrency, then=then
        )
        for record in report.records:
            out.print(workflow_panel(record))
        if report.returning:
            out.rule("returning customers (after consolidation into long-term memory)")
        for record in report.returning:
            out.print(workflow_panel(record))
            out.print(recognition_line(record), highlight=False)
        print_summary(out, report.all, report.seconds)
        if report.failed:
            raise typer.Exit(1)

    run_body(ctx.obj, body)


@cli.command()
@guard
def migrate(ctx: typer.Context) -> None:
    """Apply database migrations (a no-op when up to date)."""

    async def body(runtime: Runtime) -> None:
        out.print(f"database schema {runtime.settings.db_schema!r} is up to date")

    run_body(ctx.obj, body)


@cli.command()
@guard
def worker(
    ctx: typer.Context,
    agents: Annotated[str | None, typer.Option(help="comma-separated agents (default all)")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Run workers until SIGINT/SIGTERM (in-flight steps finish first)."""
    import signal

    names = [a.strip() for a in agents.split(",") if a.strip()] if agents else None
    if ctx.obj.settings.redis_url is None:
        # An embedded Redis is private to one process: no one else could give this worker work.
        raise ConfigurationError(
            "worker needs REDIS_URL (and DATABASE_URL) shared with the submitters; "
            "for a single-process run use `orchestrator demo` or `orchestrator submit`"
        )

    opts: Options = ctx.obj
    app = opts.app()

    async def main() -> None:
        stop = anyio.Event()
        workers: list[Worker] = []

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    for w in workers:
                        w.stop()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signal)
            delay = 0.5
            while not stop.is_set():
                try:
                    async with open_runtime(opts.settings, app, apply_migrations=False) as rt:
                        w = Worker(rt, agents=names, concurrency=concurrency)
                        workers.append(w)
                        err.print(
                            f"worker {w.consumer}: agents {', '.join(w.agents)}, "
                            f"model {rt.model.name}"
                        )
                        await w.run()
                    break
                except ServiceUnavailable as exc:
                    # Started during an outage: wait for the servers, as a running worker does.
                    if not exc.retryable or workers:
                        raise
                    logging.getLogger("orchestrator.worker").warning(
                        "%s; retrying in %.1fs", exc, delay
                    )
                with anyio.move_on_after(delay):
                    await stop.wait()
                delay = min(delay * 2, 10.0)
            tg.cancel_scope.cancel()

    anyio.run(main)


@cli.command()
@guard
def submit(
    ctx: typer.Context,
    text: Annotated[
        str | None,
        typer.Argument(help="ticket text (the pipeline's text shorthand) or a JSON file"),
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="JSON file: one input object or a list")
    ] = None,
    pipeline: Annotated[str | None, typer.Option(help="pipeline (default: the app's)")] = None,
    tenant: Annotated[str | None, typer.Option(help="tenant id")] = None,
    session: Annotated[str | None, typer.Option(help="session id (workflows run in order)")] = None,
    customer: Annotated[str | None, typer.Option(help="customer id")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait and print the result")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 60.0,
    key: Annotated[
        str | None,
        typer.Option(help="idempotency key: submitting it again returns the same workflow"),
    ] = None,
) -> None:
    """Submit a workflow: --input FILE (JSON), or text; print its id, or the result with --wait."""
    opts: Options = ctx.obj
    declared = opts.app().resolve_pipeline(pipeline)
    batch = _inputs_arg(declared, text, input_file)
    if key is not None and len(batch) != 1:
        raise InvalidInput("--key needs exactly one input (a list would share one key)")
    route = {"tenant": tenant, "session": session, "customer": customer}

    async def body(runtime: Runtime) -> None:
        if opts.settings.redis_url is None:
            # Embedded Redis lives only as long as this process: run the steps here too.
            err.print("REDIS_URL unset: running the workflow in-process")
            report = await run_local(
                runtime, batch, pipeline=declared.name, timeout=timeout, key=key
            )
            for record in report.records:
                out.print(workflow_panel(record))
            return
        client = Client(runtime)
        ids = [await client.submit(declared.name, i, key=key, **route) for i in batch]
        if not wait:
            for wid in ids:
                out.print(str(wid))
            return
        await client.wait(ids, timeout=timeout)
        for wid in ids:
            out.print(workflow_panel(await client.get(wid)))

    run_body(opts, body, migrate=False)


def _inputs_arg(pipeline: Pipeline, text: str | None, path: Path | None) -> list[Any]:
    if (text is None) == (path is None):
        raise InvalidInput("give either text or --input FILE")
    if path is not None:
        return list(load_inputs(pipeline, path))
    assert text is not None
    if text.endswith(".json") or Path(text).is_file():
        return list(load_inputs(pipeline, Path(text)))
    if pipeline.from_text is None:
        raise InvalidInput(f"pipeline {pipeline.name!r} takes no text; give --input FILE")
    try:
        return [pipeline.from_text(text)]
    except ValidationError as exc:
        raise InvalidInput(f"invalid input: {exc.errors()[0]['msg']}") from exc


@cli.command()
@guard
def status(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="workflow id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a workflow, its steps and its result."""
    wid = workflow_id_arg(workflow)

    async def body(runtime: Runtime) -> None:
        record = await Client(runtime).get(wid)
        if as_json:
            out.print_json(record.model_dump_json())
            return
        out.print(workflow_panel(record))
        out.print(steps_table(record))

    run_body(ctx.obj, body, migrate=False)


@cli.command()
@guard
def cancel(
    ctx: typer.Context, workflow: Annotated[str, typer.Argument(help="workflow id")]
) -> None:
    """Cancel a workflow: no further step starts; a running step can see it."""
    wid = workflow_id_arg(workflow)

    async def body(runtime: Runtime) -> None:
        if await Client(runtime).cancel(wid):
            out.print(f"cancelled {wid}")
        else:
            raise InvalidInput(f"workflow {wid} is not running; nothing to cancel")

    run_body(ctx.obj, body, migrate=False)


@cli.command()
@guard
def resume(
    ctx: typer.Context, workflow: Annotated[str, typer.Argument(help="workflow id")]
) -> None:
    """Re-run a failed or stuck workflow from its last checkpoint (recorded tools reused)."""
    wid = workflow_id_arg(workflow)

    async def body(runtime: Runtime) -> None:
        count = await Client(runtime).resume(wid)
        out.print(f"resumed {wid}: {count} step(s) enqueued")

    run_body(ctx.obj, body, migrate=False)


@cli.command()
@guard
def runs(
    ctx: typer.Context,
    status: Annotated[WorkflowStatus | None, typer.Option(help="only this status")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    sort: Annotated[
        RunOrder, typer.Option(help="created: newest first; cost: costliest first")
    ] = RunOrder.CREATED,
) -> None:
    """List recent workflows, newest first (or costliest first: --sort cost)."""

    async def body(runtime: Runtime) -> None:
        rows = await Client(runtime).runs(status=status, tenant=tenant, limit=limit, order=sort)
        table = Table("workflow", "tenant", "pipeline", "status", "created", "cost", "error")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["tenant_id"],
                r["pipeline"],
                r["status"],
                r["created_at"].isoformat(timespec="seconds"),
                usd(r["cost_usd"]),
                (r["error"] or "")[:60],
            )
        out.print(table)

    run_body(ctx.obj, body, migrate=False)


@cli.command()
@guard
def watch(
    ctx: typer.Context,
    workflow: Annotated[str | None, typer.Argument(help="only this workflow")] = None,
) -> None:
    """Print live step handoffs and completions until Ctrl-C (or the workflow ends)."""
    wid = workflow_id_arg(workflow) if workflow else None

    async def body(runtime: Runtime) -> None:
        async for signal in Client(runtime).watch():
            if wid is not None and signal.workflow_id != wid:
                continue
            out.print(
                f"{signal.workflow_id}  step {signal.seq}  {signal.status.value}", highlight=False
            )
            if wid is not None and signal.status.terminal:
                return

    run_body(ctx.obj, body, migrate=False)


@cli.command("input")
@guard
def input_(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="workflow id")],
    text: Annotated[str, typer.Argument(help="the reply to the question the workflow asked")],
) -> None:
    """Answer a workflow that is waiting for input; it resumes at once."""
    wid = workflow_id_arg(workflow)

    async def body(runtime: Runtime) -> None:
        await Client(runtime).provide_input(wid, text)
        out.print(f"delivered to {wid}; it resumes now")

    run_body(ctx.obj, body, migrate=False)


@cli.command("signal")
@guard
def signal_(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="workflow id")],
    name: Annotated[str, typer.Argument(help="signal name, as the agent waits for it")],
    payload: Annotated[str, typer.Argument(help="JSON payload, e.g. '{\"ok\": true}'")] = "null",
) -> None:
    """Send a named signal to a workflow: kept until a step waits for it, or wakes it."""
    wid = workflow_id_arg(workflow)
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the payload is not JSON ({exc.msg} at column {exc.colno})") from None

    async def body(runtime: Runtime) -> None:
        woke = await Client(runtime).signal(wid, name, value)
        if woke:
            out.print(f"signal {name!r} delivered to {wid}; the waiting step resumes")
        else:
            out.print(f"signal {name!r} recorded for {wid}; its next wait for it takes it")

    run_body(ctx.obj, body, migrate=False)


@cli.command()
@guard
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option("--older-than", help="finished longer ago than this: 30d, 12h, 90m, 45s")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print the counts as JSON")] = False,
) -> None:
    """Delete finished workflows' history (checkpoints, events, attempts, tool runs),
    and memories that decayed below ORCHESTRATOR_MEMORY_PRUNE_BELOW or outlived
    ORCHESTRATOR_MEMORY_RETENTION_DAYS.

    The workflows, their steps and outcomes, dead letters and transcripts stay.
    """
    seconds = parse_duration(older_than)

    async def body(runtime: Runtime) -> None:
        settings = runtime.settings
        report = await runtime.store.prune(older_than_seconds=seconds)
        report += await runtime.store.prune_memories(
            half_life_days=settings.memory_half_life_days,
            prune_below=settings.memory_prune_below,
            retention_days=settings.memory_retention_days,
        )
        if as_json:
            out.print_json(data=asdict(report))
            return
        out.print(
            f"pruned {report.workflows} workflow(s) finished over {older_than} ago: "
            f"{report.checkpoints} checkpoints, {report.events} events, "
            f"{report.attempts} step attempts, {report.tool_runs} tool runs deleted; "
            f"{report.memories} decayed or expired memories deleted",
            highlight=False,
        )

    run_body(ctx.obj, body)


@cli.command()
@guard
def forget(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="the customer's tenant")],
    customer: Annotated[str, typer.Option("--customer", help="the customer id")],
    cancel: Annotated[
        bool, typer.Option("--cancel", help="cancel the customer's unfinished workflows first")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the audit record as JSON")] = False,
) -> None:
    """Erase one customer of one tenant: transcripts, memories, workflow payloads, tool
    results, working memory and caches. Writes an audit record without personal data.

    Refused while a workflow of the customer is unfinished, unless --cancel.
    """
    if not yes:
        typer.confirm(
            f"Erase everything of customer {customer!r} of tenant {tenant!r}? "
            "This cannot be undone",
            abort=True,
        )

    async def body(runtime: Runtime) -> None:
        erasure = await forget_customer(runtime, tenant, customer, cancel=cancel)
        if as_json:
            out.print_json(
                data={
                    "erasure_id": str(erasure.erasure_id),
                    "tenant_id": erasure.tenant_id,
                    "counts": dict(erasure.counts),
                }
            )
            return
        counts = ", ".join(f"{n} {table}" for table, n in erasure.counts.items())
        out.print(f"erasure {erasure.erasure_id} of tenant {tenant}: {counts}", highlight=False)

    run_body(ctx.obj, body)


async def forget_customer(
    runtime: Runtime, tenant: str, customer: str, *, cancel: bool = False
) -> Erasure:
    """Erase ``customer`` of ``tenant`` from Redis and Postgres (see store.erasure).

    Redis first (its keys, the stream entries and delayed retries of the customer's
    finished workflows), so a Redis failure leaves Postgres as it was and a second run
    finds everything again; then Postgres in one transaction, writing the audit; then
    the keys once more, in case a racing write (a consolidation's version bump) made one.
    """
    store = ErasureStore(runtime.db)
    plan = await store.plan(tenant_id=tenant, customer_id=customer)
    if plan.unfinished and cancel:
        client = Client(runtime)
        # Queued ones first: cancelling a running one starts the next queued of its session.
        for wid in sorted(plan.unfinished, key=lambda w: plan.workflows[w] != "queued"):
            await client.cancel(wid)
        plan = await store.plan(tenant_id=tenant, customer_id=customer)
    refuse_unfinished(plan)
    with redis_errors():
        keys_deleted = await _delete_customer_keys(runtime, tenant, customer, plan.sessions)
        entries = await _delete_stream_entries(runtime, plan.workflows)
    erasure = await store.erase(
        tenant_id=tenant,
        customer_id=customer,
        extra_counts={"redis_keys": keys_deleted, "redis_entries": entries},
    )
    with redis_errors():
        await _delete_customer_keys(runtime, tenant, customer, erasure.plan.sessions)
    return erasure


async def _delete_customer_keys(
    runtime: Runtime, tenant: str, customer: str, sessions: Sequence[str]
) -> int:
    k = runtime.keys
    names = [k.memory_version(tenant, customer)]
    for session in sessions:
        names += [k.working_memory(tenant, session), k.recall_cache(tenant, session)]
    return int(await runtime.redis.delete(*names))


async def _delete_stream_entries(runtime: Runtime, workflows: Iterable[UUID]) -> int:
    """Entries (of the agents' streams, the dead-letter and consolidation streams) and
    delayed retries that carry one of ``workflows``: their envelopes hold payloads."""
    ids = [str(w).encode() for w in workflows]
    if not ids:
        return 0

    def mentions(value: Any) -> bool:
        raw = value if isinstance(value, bytes) else str(value).encode()
        return any(i in raw for i in ids)

    k, redis = runtime.keys, runtime.redis
    deleted = 0
    streams = [k.stream(a) for a in runtime.app.agents]
    for stream in [*streams, k.dead_letter_stream(), k.consolidation_stream()]:
        start: bytes | str = "-"
        while True:
            page: Any = await redis.xrange(stream, min=start, max="+", count=_PAGE)
            doomed = [i for i, fields in page if any(mentions(v) for v in fields.values())]
            if doomed:
                deleted += int(await redis.xdel(stream, *doomed))
            if len(page) < _PAGE:
                break
            start = b"(" + page[-1][0]
    async for member, _ in redis.zscan_iter(k.delayed(), count=_PAGE):
        if mentions(member):
            deleted += int(await redis.zrem(k.delayed(), member))
    return deleted


_PAGE = 500


_DURATION = re.compile(r"([+-]?\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION_SECONDS = 100 * 365 * 86400


def parse_duration(value: str) -> int:
    """``30d``, ``12h``, ``90m`` or ``45s`` as seconds; InvalidInput for anything else."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise InvalidInput(f"not a duration: {value!r} (use a number and s, m, h or d: 30d, 12h)")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if not 0 < seconds <= _MAX_DURATION_SECONDS:
        raise InvalidInput(f"duration out of range: {value!r} (more than zero, at most 100 years)")
    return seconds


cli.add_typer(dlq, name="dlq")
cli.add_typer(budget, name="budget")
cli.command()(show)


def main() -> None:
    """The ``orchestrator`` script."""
    cli()


if __name__ == "__main__":
    main()
