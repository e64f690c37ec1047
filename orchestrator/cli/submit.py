"""``orchestrator submit``: start workflows from text, a JSON file or inline JSON."""

from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from orchestrator.app import Pipeline
from orchestrator.cli.demo import load_inputs, run_local
from orchestrator.cli.render import (
    workflow_panel,
)
from orchestrator.cli.support import Options, err, guard, out, run_body
from orchestrator.client import Client
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime


@guard
def submit(
    ctx: typer.Context,
    text: Annotated[
        str | None,
        typer.Argument(help="ticket text (the pipeline's text shorthand) or a JSON file"),
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="JSON file: one input object or a list")
    ] = None,
    pipeline: Annotated[str | None, typer.Option(help="pipeline (default: the app's)")] = None,
    tenant: Annotated[str | None, typer.Option(help="tenant id")] = None,
    session: Annotated[str | None, typer.Option(help="session id (workflows run in order)")] = None,
    customer: Annotated[str | None, typer.Option(help="customer id")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait and print the result")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait")] = 60.0,
    key: Annotated[
        str | None,
        typer.Option(help="idempotency key: submitting it again returns the same workflow"),
    ] = None,
) -> None:
    """Submit a workflow: --input FILE (JSON), or text; print its id, or the result with --wait."""
    opts: Options = ctx.obj
    declared = opts.app().resolve_pipeline(pipeline)
    batch = _inputs_arg(declared, text, input_file)
    if key is not None and len(batch) != 1:
        raise InvalidInput("--key needs exactly one input (a list would share one key)")
    route = {"tenant": tenant, "session": session, "customer": customer}

    async def body(runtime: Runtime) -> None:
        if opts.settings.redis_url is None:
            # Embedded Redis lives only as long as this process: run the steps here too.
            err.print("REDIS_URL unset: running the workflow in-process")
            report = await run_local(
                runtime, batch, pipeline=declared.name, timeout=timeout, key=key
            )
            for record in report.records:
                out.print(workflow_panel(record))
            return
        client = Client(runtime)
        ids = [await client.submit(declared.name, i, key=key, **route) for i in batch]
        if not wait:
            for wid in ids:
                out.print(str(wid))
            return
        await client.wait(ids, timeout=timeout)
        for wid in ids:
            out.print(workflow_panel(await client.get(wid)))

    run_body(opts, body, migrate=False)


def _inputs_arg(pipeline: Pipeline, text: str | None, path: Path | None) -> list[Any]:
    if (text is None) == (path is None):
        raise InvalidInput("give either text or --input FILE")
    if path is not None:
        return list(load_inputs(pipeline, path))
    assert text is not None
    if text.endswith(".json") or Path(text).is_file():
        return list(load_inputs(pipeline, Path(text)))
    if pipeline.from_text is None:
        raise InvalidInput(f"pipeline {pipeline.name!r} takes no text; give --input FILE")
    try:
        return [pipeline.from_text(text)]
    except ValidationError as exc:
        raise InvalidInput(f"invalid input: {exc.errors()[0]['msg']}") from exc
