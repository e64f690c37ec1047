"""``orchestrator dlq``: list, show and retry dead letters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Annotated, Any
from uuid import UUID

import typer
from rich.table import Table

from orchestrator.cli.support import Output, guard, out, print_rows, run_body
from orchestrator.cli.workflows import run_woken
from orchestrator.client import Client
from orchestrator.runtime import Runtime

dlq = typer.Typer(help="Dead letters: steps out of attempts, in-doubt calls, bad entries.")


@dlq.command("list")
@guard
def dlq_list(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="include retried ones")] = False,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    output: Annotated[Output, typer.Option("--output", "-o", help="table, json or jsonl")] = (
        Output.TABLE
    ),
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List dead letters, newest first (workflow ids in full)."""

    async def body(runtime: Runtime) -> None:
        letters = await Client(runtime).dead_letters(include_retried=all_, limit=limit)
        rows = [asdict(d) for d in letters]
        print_rows(rows, Output.JSON if as_json else output, _letters_table)

    run_body(ctx.find_root().obj, body, migrate=False, needs_redis=False)


def _letters_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table("id", "workflow", "agent", "reason", "created", "retried")
    table.columns[1].no_wrap = True
    table.columns[1].min_width = 36
    for d in rows:
        table.add_row(
            str(d["id"]),
            str(d["workflow_id"] or "-"),
            d["agent"],
            d["reason"][:80],
            d["created_at"].isoformat(timespec="seconds"),
            d["retried_at"].isoformat(timespec="seconds") if d["retried_at"] else "",
        )
    return table


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

    run_body(ctx.find_root().obj, body, migrate=False)


@dlq.command("retry")
@guard
def dlq_retry(ctx: typer.Context, letter: Annotated[int, typer.Argument(help="id")]) -> None:
    """Retry a dead-lettered step: its workflow resumes from the last checkpoint (with an
    embedded Redis, here, as ``resume`` does)."""

    async def wake(runtime: Runtime) -> UUID:
        wid = await Client(runtime).retry_dead_letter(letter)
        out.print(f"dead letter {letter}: workflow {wid} resumed")
        return wid

    run_woken(ctx.find_root().obj, wake)
