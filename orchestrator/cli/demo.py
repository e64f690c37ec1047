"""``orchestrator demo``: the sample tickets through the support pipeline, in one process."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import anyio
import typer
from pydantic import BaseModel

from orchestrator.app import Pipeline
from orchestrator.cli.render import (
    print_summary,
    recognition_line,
    summary_table,
    ticket_line,
    workflow_panel,
)
from orchestrator.cli.support import ExitCode, err, guard, live_progress, out, run_body
from orchestrator.client import SETTLED, Client
from orchestrator.engine import consolidator
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowRecord, WorkflowStatus
from orchestrator.store.workflows import TERMINAL


@dataclass(frozen=True, slots=True)
class DemoReport:
    """The workflows of a local run, as they ended, and its wall-clock seconds."""

    records: list[WorkflowRecord]
    seconds: float
    # Follow-up tickets of earlier customers, run once the first batch was consolidated
    # into long-term memory (the returning customers).
    returning: list[WorkflowRecord] = field(default_factory=list)

    @property
    def completed(self) -> int:
        """How many workflows completed."""
        return sum(r.status is WorkflowStatus.COMPLETED for r in self.all)

    @property
    def failed(self) -> int:
        """How many workflows did not complete."""
        return len(self.all) - self.completed

    @property
    def all(self) -> list[WorkflowRecord]:
        """The first batch and the returning customers' tickets."""
        return [*self.records, *self.returning]


SAMPLES = ("orchestrator.agents", "data/tickets.json")  # the support app's sample tickets
RETURNING = ("orchestrator.agents", "data/returning.json")  # follow-ups of some of them


def load_inputs(pipeline: Pipeline, path: Path | None = None) -> list[dict[str, Any]]:
    """Inputs of ``pipeline`` from a JSON file (a list, or one object), each checked
    against its input model; the bundled sample tickets by default."""
    if path is None:
        package, name = SAMPLES
        text = resources.files(package).joinpath(name).read_text(encoding="utf-8")
        where = "agents/" + name
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
        where = str(path)
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    return inputs_from_json(pipeline, data, where)


def inputs_from_json(pipeline: Pipeline, data: Any, where: str) -> list[dict[str, Any]]:
    """``data`` (a JSON object or a non-empty list of them) as inputs of ``pipeline``,
    each checked against its input model; ``where`` names the source in errors."""
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(item, dict) for item in items):
        raise InvalidInput(f"{where} must hold a JSON object or a non-empty list of objects")
    for i, item in enumerate(items):
        try:
            pipeline.validate_input(item)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}, item {i + 1}: {exc}") from None
    return items


def returning_inputs(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The bundled follow-up tickets of sample customers (who come back)."""
    package, name = RETURNING
    items: list[dict[str, Any]] = json.loads(
        resources.files(package).joinpath(name).read_text(encoding="utf-8")
    )
    for item in items:
        pipeline.validate_input(item)
    return items


async def run_local(
    runtime: Runtime,
    inputs: Sequence[BaseModel | Mapping[str, Any]],
    *,
    pipeline: str | None = None,
    concurrency: int = 8,
    timeout: float = 120.0,
    key: str | None = None,
    then: Sequence[BaseModel | Mapping[str, Any]] = (),
    until: Collection[WorkflowStatus] = TERMINAL,
    on_settled: Callable[[WorkflowRecord], None] | None = None,
    route: Mapping[str, str | None] | None = None,
) -> DemoReport:
    """Run in-process workers for every agent, submit the inputs, wait until each is
    in one of ``until`` (terminal by default; ``SETTLED`` also stops at a workflow that
    waits), calling ``on_settled`` with each as it gets there. With ``then``: once the
    first batch is consolidated into long-term memory, submit those too (returning
    customers) and wait for them. After ``timeout`` seconds of waiting, the report holds
    the workflows as they are. ``route``: tenant, session and customer for every input."""
    client = Client(runtime)
    later: list[UUID] = []
    async with _workers(runtime, concurrency):
        start = time.perf_counter()
        ids = [await client.submit(pipeline, i, key=key, **(route or {})) for i in inputs]
        settled = await follow(runtime, ids, until=until, timeout=timeout, on_settled=on_settled)
        if then and settled:
            with anyio.move_on_after(timeout):
                while (await consolidator.lag(runtime)).oldest_seconds is not None:
                    await anyio.sleep(0.05)
            later = [await client.submit(pipeline, i, key=key) for i in then]
            await follow(runtime, later, until=until, timeout=timeout, on_settled=on_settled)
        seconds = time.perf_counter() - start
    return DemoReport(
        [await client.get(i) for i in ids], seconds, [await client.get(i) for i in later]
    )


async def drive(
    runtime: Runtime, ids: Sequence[UUID], *, timeout: float = 120.0, concurrency: int = 8
) -> list[WorkflowRecord]:
    """Run in-process workers until each workflow finishes or waits again (what the
    commands that wake a workflow do with an embedded Redis, which no worker can reach);
    return the workflows as they are then."""
    async with _workers(runtime, concurrency):
        await follow(runtime, ids, until=SETTLED, timeout=timeout)
    client = Client(runtime)
    return [await client.get(i) for i in ids]


@contextlib.asynccontextmanager
async def _workers(runtime: Runtime, concurrency: int) -> AsyncIterator[None]:
    worker = Worker(runtime, concurrency=concurrency)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            yield
        finally:
            worker.stop()


async def follow(
    runtime: Runtime,
    ids: Sequence[UUID],
    *,
    until: Collection[WorkflowStatus],
    timeout: float,
    on_settled: Callable[[WorkflowRecord], None] | None = None,
) -> bool:
    """Wait until every workflow is in one of ``until``; False after ``timeout``.
    ``on_settled`` sees each one as it gets there (checked every 0.1 s)."""
    client = Client(runtime)
    if on_settled is None:
        try:
            await client.wait(ids, timeout=timeout, until=until)
        except TimeoutError:
            return False
        return True
    pending = set(ids)
    with anyio.move_on_after(timeout):
        while pending:
            for wid in await runtime.store.terminal(list(pending), until):
                pending.discard(wid)
                on_settled(await client.get(wid))
            if pending:
                await anyio.sleep(0.1)
    return not pending


@guard
def demo(
    ctx: typer.Context,
    tickets: Annotated[Path | None, typer.Option(help="JSON file of tickets")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="print each ticket's full panel")
    ] = False,
) -> None:
    """Run the support pipeline end to end on the sample tickets: one line per ticket as
    it finishes, then a summary (--verbose: the full panels)."""
    pipeline = ctx.obj.app().resolve_pipeline(None)
    batch = load_inputs(pipeline, tickets)

    # The sample tickets come with follow-ups of two of their customers: run once the
    # first batch is in long-term memory, they show returning customers recognised.
    then = returning_inputs(pipeline) if tickets is None and pipeline.consolidate else []

    async def body(runtime: Runtime) -> ExitCode:
        err.print(f"model: {runtime.model.name}", highlight=False)
        with live_progress("tickets", total=len(batch) + len(then)) as shown:
            seen = 0

            def settled(record: WorkflowRecord) -> None:
                nonlocal seen
                seen += 1
                if seen == len(batch) + 1:  # the first returning customer's ticket
                    shown.rule("returning customers (after consolidation into long-term memory)")
                shown.print(workflow_panel(record) if verbose else ticket_line(record))
                if seen > len(batch):
                    shown.print(recognition_line(record))
                shown.advance()

            report = await run_local(
                runtime,
                batch,
                pipeline=pipeline.name,
                concurrency=concurrency,
                then=then,
                on_settled=settled,
            )
        out.print(summary_table(report.all, report.seconds))
        print_summary(out, report.all, report.seconds)
        return ExitCode.OK if not report.failed else ExitCode.ERROR

    raise typer.Exit(run_body(ctx.obj, body))
