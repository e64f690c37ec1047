"""The ``orchestrator`` command line.

Every failure is one line on stderr and a non-zero exit; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from uuid import UUID

import anyio
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from orchestrator.app import App, load_app
from orchestrator.client import Client
from orchestrator.demo import load_tickets, run_local
from orchestrator.errors import ConfigurationError, InvalidInput, OrchestratorError
from orchestrator.render import print_summary, steps_table, workflow_panel
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.worker import Worker
from schemas import Ticket

T = TypeVar("T")
cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Durable multi-agent workflows on Redis and Postgres.",
)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def guard(command: Callable[..., None]) -> Callable[..., None]:
    """Turn any failure into one line on stderr and exit 1 (traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if "--debug" in sys.argv:
                traceback.print_exc()
            if isinstance(exc, OrchestratorError):
                err.print(f"orchestrator: error: {exc}", markup=False, highlight=False)
            else:
                err.print(
                    f"orchestrator: unexpected error: {type(exc).__name__}: {exc} "
                    "(run with --debug for the traceback)",
                    markup=False,
                    highlight=False,
                )
            raise typer.Exit(1) from None

    return wrapper


class Options:
    def __init__(self, app_path: str | None) -> None:
        try:
            self.settings = Settings()
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ConfigurationError(
                f"bad setting {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
            ) from exc
        self.app_path = app_path or self.settings.app

    def app(self) -> App:
        return load_app(self.app_path)


@cli.callback()
@guard
def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option("--app", help="module:attr of the App")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    opts = Options(app)
    level = (
        logging.DEBUG
        if debug
        else getattr(logging, opts.settings.log_level.upper(), logging.WARNING)
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = opts


def _run(opts: Options, body: Callable[[Runtime], Awaitable[T]], *, migrate: bool = True) -> T:
    app = opts.app()

    async def main() -> T:
        async with open_runtime(opts.settings, app, apply_migrations=migrate) as runtime:
            return await body(runtime)

    return anyio.run(main)


@cli.command()
@guard
def demo(
    ctx: typer.Context,
    tickets: Annotated[Path | None, typer.Option(help="JSON file of tickets")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
) -> None:
    """Run the support pipeline end to end on the sample tickets."""
    batch = load_tickets(tickets)

    async def body(runtime: Runtime) -> None:
        err.print(f"model: {runtime.model.name}")
        report = await run_local(runtime, batch, concurrency=concurrency)
        for record in report.records:
            out.print(workflow_panel(record))
        print_summary(out, report.records, report.seconds)
        if report.failed:
            raise typer.Exit(1)

    _run(ctx.obj, body)


@cli.command()
@guard
def migrate(ctx: typer.Context) -> None:
    """Apply database migrations (a no-op when up to date)."""

    async def body(runtime: Runtime) -> None:
        out.print(f"database schema {runtime.settings.db_schema!r} is up to date")

    _run(ctx.obj, body)


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

    async def body(runtime: Runtime) -> None:
        w = Worker(runtime, agents=names, concurrency=concurrency)
        err.print(f"worker {w.consumer}: agents {', '.join(w.agents)}, model {runtime.model.name}")

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    w.stop()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signal)
            await w.run()
            tg.cancel_scope.cancel()

    _run(ctx.obj, body, migrate=False)


@cli.command()
@guard
def submit(
    ctx: typer.Context,
    ticket: Annotated[str, typer.Argument(help="ticket text, or a path to a ticket JSON file")],
    customer: Annotated[str, typer.Option(help="customer id (text tickets)")] = "anonymous",
    tenant: Annotated[str, typer.Option(help="tenant id (text tickets)")] = "default",
    wait: Annotated[bool, typer.Option("--wait", help="wait and print the result")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 60.0,
) -> None:
    """Submit a ticket (text or JSON file); print its workflow id, or the result with --wait."""
    opts: Options = ctx.obj
    batch = _ticket_arg(ticket, customer, tenant)

    async def body(runtime: Runtime) -> None:
        if opts.settings.redis_url is None:
            # Embedded Redis lives only as long as this process: run the steps here too.
            err.print("REDIS_URL unset: running the workflow in-process")
            report = await run_local(runtime, batch, timeout=timeout)
            for record in report.records:
                out.print(workflow_panel(record))
            return
        client = Client(runtime)
        ids = [await client.submit(t) for t in batch]
        if not wait:
            for wid in ids:
                out.print(str(wid))
            return
        await client.wait(ids, timeout=timeout)
        for wid in ids:
            out.print(workflow_panel(await client.get(wid)))

    _run(opts, body, migrate=False)


def _ticket_arg(value: str, customer: str, tenant: str) -> list[Ticket]:
    path = Path(value)
    if value.endswith(".json") or path.is_file():
        return load_tickets(path)
    try:
        return [Ticket(tenant_id=tenant, customer_id=customer, subject=value[:80], body=value)]
    except ValidationError as exc:
        raise InvalidInput(f"invalid ticket: {exc.errors()[0]['msg']}") from exc


@cli.command()
@guard
def status(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="workflow id")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show a workflow, its steps and its result."""
    wid = _workflow_id(workflow)

    async def body(runtime: Runtime) -> None:
        record = await Client(runtime).get(wid)
        if as_json:
            out.print_json(record.model_dump_json())
            return
        out.print(workflow_panel(record))
        out.print(steps_table(record))

    _run(ctx.obj, body, migrate=False)


def _workflow_id(value: str) -> UUID:
    try:
        return UUID(value)
    except ValueError:
        raise InvalidInput(f"not a workflow id: {value!r}") from None


@cli.command()
@guard
def cancel(
    ctx: typer.Context, workflow: Annotated[str, typer.Argument(help="workflow id")]
) -> None:
    """Cancel a workflow: no further step starts; a running step can see it."""
    wid = _workflow_id(workflow)

    async def body(runtime: Runtime) -> None:
        if await Client(runtime).cancel(wid):
            out.print(f"cancelled {wid}")
        else:
            raise InvalidInput(f"workflow {wid} is not running; nothing to cancel")

    _run(ctx.obj, body, migrate=False)


@cli.command()
@guard
def resume(
    ctx: typer.Context, workflow: Annotated[str, typer.Argument(help="workflow id")]
) -> None:
    """Re-run a failed or stuck workflow from its last checkpoint (recorded tools reused)."""
    wid = _workflow_id(workflow)

    async def body(runtime: Runtime) -> None:
        count = await Client(runtime).resume(wid)
        out.print(f"resumed {wid}: {count} step(s) enqueued")

    _run(ctx.obj, body, migrate=False)


@cli.command("input")
@guard
def input_(
    ctx: typer.Context,
    workflow: Annotated[str, typer.Argument(help="workflow id")],
    text: Annotated[str, typer.Argument(help="the reply to the question the workflow asked")],
) -> None:
    """Answer a workflow that is waiting for input; it resumes at once."""
    wid = _workflow_id(workflow)

    async def body(runtime: Runtime) -> None:
        await Client(runtime).provide_input(wid, text)
        out.print(f"delivered to {wid}; it resumes now")

    _run(ctx.obj, body, migrate=False)


dlq = typer.Typer(help="Dead letters: steps out of attempts, in-doubt calls, bad entries.")
cli.add_typer(dlq, name="dlq")


@dlq.command("list")
@guard
def dlq_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="include retried ones")] = False,
    limit: Annotated[int, typer.Option(min=1)] = 50,
) -> None:
    """List dead letters, newest first."""

    async def body(runtime: Runtime) -> None:
        letters = await Client(runtime).dead_letters(include_retried=all_, limit=limit)
        table = Table("id", "workflow", "agent", "reason", "created", "retried")
        for d in letters:
            table.add_row(
                str(d.id),
                str(d.workflow_id or "-"),
                d.agent,
                d.reason[:80],
                d.created_at.isoformat(timespec="seconds"),
                d.retried_at.isoformat(timespec="seconds") if d.retried_at else "",
            )
        out.print(table)

    _run(ctx.find_root().obj, body, migrate=False)


@dlq.command("show")
@guard
def dlq_show(ctx: typer.Context, letter: Annotated[int, typer.Argument(help="id")]) -> None:
    """Show one dead letter with its envelope."""

    async def body(runtime: Runtime) -> None:
        d = await Client(runtime).dead_letter(letter)
        out.print(
            f"id: {d.id}\nworkflow: {d.workflow_id}\nstep: {d.step_id}\n"
            f"agent: {d.agent}\nreason: {d.reason}\ncreated: {d.created_at}\n"
            f"retried: {d.retried_at}",
            markup=False,
            highlight=False,
        )
        out.print_json(d.envelope) if d.envelope.startswith("{") else out.print(d.envelope)

    _run(ctx.find_root().obj, body, migrate=False)


@dlq.command("retry")
@guard
def dlq_retry(ctx: typer.Context, letter: Annotated[int, typer.Argument(help="id")]) -> None:
    """Retry a dead-lettered step: its workflow resumes from the last checkpoint."""

    async def body(runtime: Runtime) -> None:
        wid = await Client(runtime).retry_dead_letter(letter)
        out.print(f"dead letter {letter}: workflow {wid} resumed")

    _run(ctx.find_root().obj, body, migrate=False)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
