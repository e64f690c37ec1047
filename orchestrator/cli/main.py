"""The ``orchestrator`` command line.

Every failure is one line on stderr and a non-zero exit; ``--debug`` adds the traceback.
Exit codes (``ExitCode``): 0 done, 1 error, 2 usage, 3 a workflow failed under ``--wait``,
4 a workflow waits for input under ``--wait``.
"""

from __future__ import annotations

import logging
import sys
from importlib.metadata import version
from typing import Annotated

import typer

from orchestrator.cli.agents import agents
from orchestrator.cli.budget import budget
from orchestrator.cli.demo import demo
from orchestrator.cli.dlq import dlq
from orchestrator.cli.maintenance import forget, migrate, prune
from orchestrator.cli.show import show
from orchestrator.cli.submit import submit
from orchestrator.cli.support import ExitCode, Options, err, guard
from orchestrator.cli.worker import worker
from orchestrator.cli.workflows import cancel, input_, resume, runs, signal_, status, watch
from orchestrator.errors import ConfigurationError
from orchestrator.logs import configure as configure_logging

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Durable multi-agent workflows on Redis and Postgres.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

try:  # typer >= 0.25 carries its own copy of click (its exceptions are not click's)
    from typer._click import exceptions as parse_errors
except ImportError:  # pragma: no cover - older typer on click
    from click import exceptions as parse_errors  # type: ignore[no-redef]

DISTRIBUTION = "durable-agents-runtime"


def _default_level(ctx: typer.Context) -> str:
    return "INFO" if ctx.invoked_subcommand == "worker" else "WARNING"


def _print_version(value: bool) -> None:
    if value:
        print(f"orchestrator {version(DISTRIBUTION)}")
        raise typer.Exit()


@cli.callback()
@guard
def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option("--app", help="module:attr of the App")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Read the settings and set up logging before any command; the commands find the
    Options on ``ctx.obj``."""
    opts = Options(app)
    name = "DEBUG" if debug else (opts.settings.log_level or _default_level(ctx)).upper()
    level = logging.getLevelNamesMapping().get(name)
    if level is None:
        raise ConfigurationError(f"bad setting log_level: {name!r} is not a logging level")
    configure_logging(level, opts.settings.log_format)
    ctx.obj = opts


for command in (demo, migrate, worker, submit, status, runs, watch, cancel, resume):
    cli.command()(command)
cli.command("input")(input_)
cli.command("signal")(signal_)
cli.command()(prune)
cli.command()(forget)
cli.command()(show)
cli.command()(agents)
cli.add_typer(dlq, name="dlq")
cli.add_typer(budget, name="budget")


def main(args: list[str] | None = None) -> None:
    """The ``orchestrator`` script (and ``python -m orchestrator``).

    Usage errors are one line (typer would draw a box over several) and exit 2."""
    try:
        code = cli(args=args, prog_name="orchestrator", standalone_mode=False)
    except parse_errors.NoArgsIsHelpError as exc:
        exc.show()
        code = ExitCode.USAGE
    except parse_errors.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "orchestrator"
        err.print(
            f"orchestrator: usage error: {exc.format_message()} (see '{where} --help')",
            markup=False,
            highlight=False,
        )
        code = ExitCode.USAGE
    except typer.Abort:
        err.print("orchestrator: aborted", markup=False, highlight=False)
        code = ExitCode.ERROR
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
