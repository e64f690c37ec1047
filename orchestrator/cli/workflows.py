"""Commands on one workflow or the list of them: status, runs, watch, cancel, resume,
input, signal."""

import json
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.render import (
    steps_table,
    workflow_panel,
)
from orchestrator.cli.support import guard, out, run_body, workflow_id_arg
from orchestrator.client import Client
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus


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


@guard
def runs(
    ctx: typer.Context,
    status: Annotated[WorkflowStatus | None, typer.Option(help="only this status")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
) -> None:
    """List recent workflows, newest first."""

    async def body(runtime: Runtime) -> None:
        rows = await Client(runtime).runs(status=status, tenant=tenant, limit=limit)
        table = Table("workflow", "tenant", "pipeline", "status", "created", "error")
        for r in rows:
            table.add_row(
                str(r["id"]),
                r["tenant_id"],
                r["pipeline"],
                r["status"],
                r["created_at"].isoformat(timespec="seconds"),
                (r["error"] or "")[:60],
            )
        out.print(table)

    run_body(ctx.obj, body, migrate=False)


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
