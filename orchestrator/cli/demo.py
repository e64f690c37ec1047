"""``orchestrator demo``: the sample tickets through the support pipeline, in one process."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from uuid import UUID

import anyio
import typer
from pydantic import BaseModel

from orchestrator.app import Pipeline
from orchestrator.cli.render import print_summary, recognition_line, workflow_panel
from orchestrator.cli.support import err, guard, out, run_body
from orchestrator.client import Client
from orchestrator.engine import consolidator
from orchestrator.engine.worker import Worker
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowRecord, WorkflowStatus


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
) -> DemoReport:
    """Run in-process workers for every agent, submit the inputs, wait for all to finish.
    With ``then``: once the first batch is consolidated into long-term memory, submit
    those too (returning customers) and wait for them."""
    worker = Worker(runtime, concurrency=concurrency)
    client = Client(runtime)
    later: list[UUID] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        start = time.perf_counter()
        ids = [await client.submit(pipeline, i, key=key) for i in inputs]
        await client.wait(ids, timeout=timeout)
        if then:
            with anyio.fail_after(timeout):
                while (await consolidator.lag(runtime)).oldest_seconds is not None:
                    await anyio.sleep(0.05)
            later = [await client.submit(pipeline, i, key=key) for i in then]
            await client.wait(later, timeout=timeout)
        seconds = time.perf_counter() - start
        worker.stop()
    return DemoReport(
        [await client.get(i) for i in ids], seconds, [await client.get(i) for i in later]
    )


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
