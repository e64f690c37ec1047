"""Shared pieces of the command line: consoles, settings, the error guard, running a body."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

import anyio
import typer
from pydantic import ValidationError
from rich.console import Console

from orchestrator.app import App, load_app
from orchestrator.errors import ConfigurationError, InvalidInput, OrchestratorError
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.telemetry import Telemetry, open_telemetry

T = TypeVar("T")

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


def run_body(opts: Options, body: Callable[[Runtime], Awaitable[T]], *, migrate: bool = True) -> T:
    """Open a runtime (applying migrations unless ``migrate=False``), run ``body`` on it in
    a new event loop, close it, and return what ``body`` returned."""
    app = opts.app()

    async def main(telemetry: Telemetry) -> T:
        async with open_runtime(
            opts.settings,
            app,
            apply_migrations=migrate,
            tracer_provider=telemetry.tracer_provider,
            meter_provider=telemetry.meter_provider,
        ) as runtime:
            return await body(runtime)

    with open_telemetry(opts.settings) as telemetry:  # flushed when the command ends
        return anyio.run(main, telemetry)


def workflow_id_arg(value: str) -> UUID:
    """A workflow id from the command line; InvalidInput when it is not a UUID."""
    try:
        return UUID(value)
    except ValueError:
        raise InvalidInput(f"not a workflow id: {value!r}") from None
