"""The ``orchestrator`` command line.

Every failure is one line on stderr and a non-zero exit; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from orchestrator.cli.demo import demo
from orchestrator.cli.dlq import dlq
from orchestrator.cli.maintenance import forget, migrate, prune
from orchestrator.cli.submit import submit
from orchestrator.cli.support import Options, guard
from orchestrator.cli.worker import worker
from orchestrator.cli.workflows import cancel, input_, resume, runs, signal_, status, watch

cli = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Durable multi-agent workflows on Redis and Postgres.",
)


@cli.callback()
@guard
def root(
    ctx: typer.Context,
    app: Annotated[str | None, typer.Option("--app", help="module:attr of the App")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
) -> None:
    """Read the settings and set up logging before any command; the commands find the
    Options on ``ctx.obj``."""
    opts = Options(app)
    level = (
        logging.DEBUG
        if debug
        else getattr(logging, opts.settings.log_level.upper(), logging.WARNING)
    )
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = opts


for command in (demo, migrate, worker, submit, status, runs, watch, cancel, resume):
    cli.command()(command)
cli.command("input")(input_)
cli.command("signal")(signal_)
cli.command()(prune)
cli.command()(forget)
cli.add_typer(dlq, name="dlq")


def main() -> None:
    """The ``orchestrator`` script."""
    cli()


if __name__ == "__main__":
    main()
