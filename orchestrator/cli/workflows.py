"""Commands on one workflow or the list of them: status, runs, watch, cancel, resume,
input, signal.

Each takes a whole workflow id or a unique prefix of one. With an embedded Redis (no
``REDIS_URL``) no worker can reach the queue, so the commands that wake a workflow
(input, signal, resume) run it here until it finishes or waits again.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Annotated
from uuid import UUID

import anyio
import typer

from orchestrator.cli.demo import drive
from orchestrator.cli.render import (
    event_line,
    exit_code,
    print_records,
    runs_table,
    steps_table,
    workflow_panel,
)
from orchestrator.cli.support import (
    ExitCode,
    Options,
    Output,
    err,
    guard,
    out,
    print_rows,
    run_body,
    workflow_arg,
    workflow_id,
)
from orchestrator.client import Client
from orchestrator.connections import REDIS_DOWN
from orchestrator.errors import ConfigurationError, InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.store.workflows import RunOrder

WorkflowArg = Annotated[
    str, typer.Argument(help="workflow id, or a unique prefix of one", callback=workflow_arg)
]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON")]


@guard
def status(ctx: typer.Context, workflow: WorkflowArg, as_json: JsonFlag = False) -> None:
    """Show a workflow, its steps and its result; who runs its open steps (from Redis)."""

    async def body(runtime: Runtime) -> None:
        client = Client(runtime)
        record = await client.get(await workflow_id(runtime, workflow))
        leases = await client.leases(record)
        if as_json:
            data = record.model_dump(mode="json")
            data["leases"] = {str(k): v for k, v in leases.items()}
            out.print_json(data=data)
            return
        out.print(workflow_panel(record))
        out.print(steps_table(record, leases))

    # Postgres holds all of it: shown while Redis is down too (without the leases).
    run_body(ctx.obj, body, migrate=False, needs_redis=False)


@guard
def cancel(ctx: typer.Context, workflow: WorkflowArg) -> None:
    """Cancel a workflow: no further step starts; a running step can see it."""

    async def body(runtime: Runtime) -> None:
        wid = await workflow_id(runtime, workflow)
        if await Client(runtime).cancel(wid):
            out.print(f"cancelled {wid}")
        else:
            raise InvalidInput(f"workflow {wid} is not running; nothing to cancel")

    run_body(ctx.obj, body, migrate=False)


@guard
def resume(ctx: typer.Context, workflow: WorkflowArg) -> None:
    """Re-run a failed or stuck workflow from its last checkpoint (recorded tools reused)."""

    async def act(runtime: Runtime, wid: UUID) -> None:
        count = await Client(runtime).resume(wid)
        out.print(f"resumed {wid}: {count} step(s) enqueued")

    _wake(ctx.obj, workflow, act)


@guard
def runs(
    ctx: typer.Context,
    status: Annotated[WorkflowStatus | None, typer.Option(help="only this status")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    sort: Annotated[
        RunOrder, typer.Option(help="created: newest first; cost: costliest first")
    ] = RunOrder.CREATED,
    output: Annotated[Output, typer.Option("--output", "-o", help="table, json or jsonl")] = (
        Output.TABLE
    ),
    as_json: JsonFlag = False,
) -> None:
    """List recent workflows, newest first (or costliest first: --sort cost); ids in
    full (any unique prefix works too)."""

    async def body(runtime: Runtime) -> None:
        rows = await Client(runtime).runs(status=status, tenant=tenant, limit=limit, order=sort)
        print_rows(rows, Output.JSON if as_json else output, runs_table)

    run_body(ctx.obj, body, migrate=False, needs_redis=False)


@guard
def watch(
    ctx: typer.Context,
    workflow: Annotated[
        str | None,
        typer.Argument(help="follow this workflow (id or unique prefix)", callback=workflow_arg),
    ] = None,
) -> None:
    """Follow one workflow's events until it finishes (its history first), or, without an
    id, every live handoff and completion until Ctrl-C."""
    opts: Options = ctx.obj
    if workflow is None:
        if opts.settings.redis_url is None:
            raise ConfigurationError(
                "watch without a workflow id follows live signals in Redis: set REDIS_URL "
                "(an embedded Redis is private to each command); or give a workflow id"
            )
        run_body(opts, _watch_all, migrate=False)
        return

    async def body(runtime: Runtime) -> None:
        wid = await workflow_id(runtime, workflow)
        await _follow_events(runtime, wid, live=opts.settings.redis_url is not None)

    run_body(opts, body, migrate=False, needs_redis=False)


async def _watch_all(runtime: Runtime) -> None:
    async for signal in Client(runtime).watch():
        line = f"{signal.workflow_id}  step {signal.seq}  {signal.status.value}"
        out.print(line, highlight=False)


async def _follow_events(runtime: Runtime, wid: UUID, *, live: bool) -> None:
    """Print the workflow's events as Postgres records them until it is terminal. A
    Pub/Sub signal only makes the next read come sooner."""
    client, last = Client(runtime), 0
    nudged = anyio.Event()

    async def listen() -> None:
        try:
            async for signal in client.watch():
                if signal.workflow_id == wid:
                    nudged.set()
        except REDIS_DOWN:
            return  # no nudges: the reads every second still follow it

    async with anyio.create_task_group() as tg:
        if live:
            tg.start_soon(listen)
        while True:
            state = await runtime.store.workflow_status(wid)
            for event in await runtime.store.events_after(wid, last):
                out.print(event_line(event), highlight=False, soft_wrap=True)
                last = event.id
            if state.terminal or not live:  # embedded: nothing else can move it on
                break
            with anyio.move_on_after(1.0):
                await nudged.wait()
            nudged = anyio.Event()
        tg.cancel_scope.cancel()
    record = await client.get(wid)
    out.print(f"{wid}: {record.status.value}", highlight=False)
    if not record.status.terminal and not live:
        err.print(
            "REDIS_URL unset: no worker can reach an embedded Redis; `orchestrator input`, "
            "`signal` or `resume` run the workflow in this process",
            highlight=False,
        )


@guard
def input_(
    ctx: typer.Context,
    workflow: WorkflowArg,
    text: Annotated[str, typer.Argument(help="the reply to the question the workflow asked")],
) -> None:
    """Answer a workflow that is waiting for input; it resumes at once."""

    async def act(runtime: Runtime, wid: UUID) -> None:
        await Client(runtime).provide_input(wid, text)
        out.print(f"delivered to {wid}; it resumes now", highlight=False)

    _wake(ctx.obj, workflow, act)


@guard
def signal_(
    ctx: typer.Context,
    workflow: WorkflowArg,
    name: Annotated[str, typer.Argument(help="signal name, as the agent waits for it")],
    payload: Annotated[str, typer.Argument(help="JSON payload, e.g. '{\"ok\": true}'")] = "null",
) -> None:
    """Send a named signal to a workflow: kept until a step waits for it, or wakes it."""
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"the payload is not JSON ({exc.msg} at column {exc.colno})") from None

    async def act(runtime: Runtime, wid: UUID) -> None:
        woke = await Client(runtime).signal(wid, name, value)
        if woke:
            out.print(f"signal {name!r} delivered to {wid}; the waiting step resumes")
        else:
            out.print(f"signal {name!r} recorded for {wid}; its next wait for it takes it")

    _wake(ctx.obj, workflow, act)


def _wake(opts: Options, workflow: str, act: Callable[[Runtime, UUID], Awaitable[None]]) -> None:
    """Run ``act`` on the workflow (``run_woken``)."""

    async def wake(runtime: Runtime) -> UUID:
        wid = await workflow_id(runtime, workflow)
        await act(runtime, wid)
        return wid

    run_woken(opts, wake)


def run_woken(opts: Options, wake: Callable[[Runtime], Awaitable[UUID]]) -> None:
    """Run ``wake`` (it wakes a workflow and returns its id); with an embedded Redis, then
    run the workflow here until it finishes or waits again, print it, and exit as
    ``submit --wait`` does."""

    async def body(runtime: Runtime) -> ExitCode:
        wid = await wake(runtime)
        if opts.settings.redis_url is not None:
            return ExitCode.OK
        err.print("REDIS_URL unset: running the workflow in-process")
        records = await drive(runtime, [wid])
        print_records(records)
        return exit_code(records)

    code = run_body(opts, body, migrate=False)
    if code:
        raise typer.Exit(code)
