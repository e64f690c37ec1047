"""``orchestrator demo``: the sample tickets through triage → research → response."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from pydantic import ValidationError

from orchestrator.client import Client
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.worker import Worker
from schemas import Ticket, WorkflowRecord, WorkflowStatus


@dataclass(frozen=True, slots=True)
class DemoReport:
    records: list[WorkflowRecord]
    seconds: float

    @property
    def completed(self) -> int:
        return sum(r.status is WorkflowStatus.COMPLETED for r in self.records)

    @property
    def failed(self) -> int:
        return len(self.records) - self.completed


def load_tickets(path: Path | None = None) -> list[Ticket]:
    """Tickets from a JSON file (a list, or one object); the bundled samples by default."""
    if path is None:
        text = resources.files("examples").joinpath("tickets.json").read_text(encoding="utf-8")
        where = "examples/tickets.json"
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror}") from exc
        where = str(path)
    try:
        data: Any = json.loads(text)
        items = data if isinstance(data, list) else [data]
        return [Ticket.model_validate(item) for item in items]
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{where} is not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{where} is not a valid ticket ({field}: {first['msg']})") from exc


async def run_local(
    runtime: Runtime, tickets: list[Ticket], *, concurrency: int = 8, timeout: float = 120.0
) -> DemoReport:
    """Run in-process workers for every agent, submit the tickets, wait for all to finish."""
    worker = Worker(runtime, concurrency=concurrency)
    client = Client(runtime)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        start = time.perf_counter()
        ids = [await client.submit(t) for t in tickets]
        await client.wait(ids, timeout=timeout)
        seconds = time.perf_counter() - start
        worker.stop()
    return DemoReport([await client.get(i) for i in ids], seconds)
