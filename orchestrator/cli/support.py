"""Shared pieces of the command line: consoles, settings, the error guard, running a body."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from enum import IntEnum, StrEnum
from typing import Any, TypeVar
from uuid import UUID

import anyio
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from orchestrator.app import App, load_app
from orchestrator.errors import ConfigurationError, InvalidInput, OrchestratorError
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.store.history import prefix_digits
from orchestrator.telemetry import Telemetry, open_telemetry

T = TypeVar("T")


class ExitCode(IntEnum):
    """What the ``orchestrator`` command exits with (documented in the README)."""

    OK = 0
    ERROR = 1  # anything failed: one line on stderr says what
    USAGE = 2  # the command line itself is wrong
    WORKFLOW_FAILED = 3  # --wait: a workflow failed or was cancelled
    WAITING = 4  # --wait: a workflow waits for input (or a signal)


out = Console()
err = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[], None]]:
    """Yield ``advance()``, to call once per item done: a progress bar on stderr when it is
    a terminal; otherwise a plain line at every tenth (logs and CI stay readable). Nothing
    for a single item."""
    if total <= 1:
        yield lambda: None
        return
    if err.is_terminal:
        with Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=total)
            yield lambda: bar.advance(task)
        return
    done = 0
    step = max(1, total // 10)

    def advance() -> None:
        nonlocal done
        done += 1
        if done % step == 0 or done == total:
            err.print(f"{label}: {done}/{total}", highlight=False)

    yield advance


@contextlib.contextmanager
def activity(label: str) -> Iterator[Callable[[str], None]]:
    """Yield ``note(text)`` to say how long work with no known end is getting on: a
    spinner on stderr when it is a terminal, otherwise a plain line (at most one a
    second: logs stay readable)."""
    if not err.is_terminal:
        last = 0.0

        def line(text: str) -> None:
            nonlocal last
            if time.monotonic() - last >= 1.0:
                last = time.monotonic()
                err.print(f"{label}: {text}", highlight=False, markup=False)

        yield line
        return
    with err.status(label) as spinner:
        yield lambda text: spinner.update(f"{label}: {text}")


class Output(StrEnum):
    """How a command prints a list (``--output``)."""

    TABLE = "table"
    JSON = "json"  # one JSON array
    JSONL = "jsonl"  # one JSON object per line


def print_rows(
    rows: Sequence[Mapping[str, Any]], output: Output, table: Callable[[Sequence[Any]], Table]
) -> None:
    """``rows`` as a rich table (built by ``table``), a JSON array, or JSON lines."""
    if output is Output.TABLE:
        out.print(table(rows))
        return
    encoded = [json.dumps(dict(r), default=_jsonable) for r in rows]
    if output is Output.JSONL:
        for line in encoded:
            out.out(line, highlight=False)
    else:
        out.print_json("[" + ",".join(encoded) + "]")


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):  # money: a JSON number
        return float(value)
    return str(value)


class Shown:
    """Lines printed above a live progress bar (or plainly, off a terminal)."""

    def __init__(self, bar: Progress | None, task: TaskID | None) -> None:
        self._bar, self._task = bar, task

    def print(self, renderable: Any) -> None:
        """Print a line or a panel to stdout, above the bar."""
        (self._bar.console if self._bar else out).print(renderable, highlight=False)

    def rule(self, title: str) -> None:
        """A horizontal rule with a title."""
        (self._bar.console if self._bar else out).rule(title)

    def advance(self) -> None:
        """One more item done."""
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task)


@contextlib.contextmanager
def live_progress(label: str, total: int) -> Iterator[Shown]:
    """A progress bar under the lines printed through the yielded ``Shown`` when stdout
    is a terminal; plain lines otherwise."""
    if not out.is_terminal:
        yield Shown(None, None)
        return
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=out,
        transient=True,
    ) as bar:
        yield Shown(bar, bar.add_task(label, total=total))


def guard(command: Callable[..., None]) -> Callable[..., None]:
    """Turn any failure into one line on stderr and exit 1 (traceback only with --debug)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as raised:
            exc = _sole(raised)
            if isinstance(exc, typer.Exit | typer.Abort):
                raise exc from None
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
            raise typer.Exit(ExitCode.ERROR) from None

    return wrapper


def _sole(exc: Exception) -> Exception:
    """The one exception a task group wrapped (anyio raises groups), else ``exc``."""
    while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


class Options:
    """What every command shares: the settings from the environment and the app path
    (``--app``, else the ``app`` setting). Bad settings raise ConfigurationError."""

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
        """Import the App at ``app_path``; ConfigurationError when it cannot."""
        return load_app(self.app_path)


def run_body(
    opts: Options,
    body: Callable[[Runtime], Awaitable[T]],
    *,
    migrate: bool = True,
    needs_redis: bool = True,
) -> T:
    """Open a runtime (applying migrations unless ``migrate=False``; while Redis is down
    too, unless ``needs_redis``), run ``body`` on it in a new event loop, close it, and
    return what ``body`` returned."""
    app = opts.app()

    async def main(telemetry: Telemetry) -> T:
        async with open_runtime(
            opts.settings,
            app,
            apply_migrations=migrate,
            redis_required=needs_redis,
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
        ) as runtime:
            return await body(runtime)

    with open_telemetry(opts.settings) as telemetry:  # flushed when the command ends
        return anyio.run(main, telemetry)


def workflow_arg(value: str | None) -> str | None:
    """Check a workflow id argument before anything connects: a usage error (exit 2)
    when it cannot be an id or a prefix of one."""
    if value is not None:
        try:
            prefix_digits(value)
        except InvalidInput as exc:
            raise typer.BadParameter(str(exc)) from None
    return value


async def workflow_id(runtime: Runtime, value: str) -> UUID:
    """A workflow id from the command line: a whole id, or a unique prefix of one (as
    ``runs`` lists them); InvalidInput when it is neither, or ambiguous."""
    try:
        return UUID(value)
    except ValueError:
        return await runtime.store.resolve_workflow(value.strip())
