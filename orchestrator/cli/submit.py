"""``orchestrator submit``: start workflows from text, a JSON file or inline JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from orchestrator.app import Pipeline
from orchestrator.cli.demo import inputs_from_json, load_inputs, run_local
from orchestrator.cli.render import exit_code, print_records
from orchestrator.cli.support import ExitCode, Options, err, guard, out, progress, run_body
from orchestrator.client import SETTLED, Client
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime


@guard
def submit(
    ctx: typer.Context,
    text: Annotated[
        str | None,
        typer.Argument(
            help="ticket text (the pipeline's text shorthand), inline JSON, or a JSON file"
        ),
    ] = None,
    input_file: Annotated[
        Path | None, typer.Option("--input", help="JSON file: one input object or a list")
    ] = None,
    as_text: Annotated[
        bool, typer.Option("--text", help="take TEXT as text even if it looks like a path")
    ] = False,
    pipeline: Annotated[str | None, typer.Option(help="pipeline (default: the app's)")] = None,
    tenant: Annotated[str | None, typer.Option(help="tenant id")] = None,
    session: Annotated[str | None, typer.Option(help="session id (workflows run in order)")] = None,
    customer: Annotated[str | None, typer.Option(help="customer id")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait",
            help="wait and print the result; exit 3 if a workflow failed, 4 if one waits",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait", min=0)] = 60.0,
    key: Annotated[
        str | None,
        typer.Option(help="idempotency key: submitting it again returns the same workflow"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Submit workflows: text, inline JSON, or a JSON file (one object or a list).

    Prints the workflow ids; with --wait, the results (exit 3: a workflow failed or was
    cancelled; 4: one waits for input, and the command to answer it is printed).
    """
    opts: Options = ctx.obj
    declared = opts.app().resolve_pipeline(pipeline)
    batch = inputs_arg(declared, text, input_file, as_text=as_text)
    if key is not None and len(batch) != 1:
        raise InvalidInput("--key needs exactly one input (a list would share one key)")
    route = {"tenant": tenant, "session": session, "customer": customer}

    async def body(runtime: Runtime) -> ExitCode:
        if opts.settings.redis_url is None:
            # Embedded Redis lives only as long as this process: run the steps here too,
            # until each workflow finishes or waits for someone.
            err.print("REDIS_URL unset: running the workflow in-process")
            report = await run_local(
                runtime,
                batch,
                pipeline=declared.name,
                timeout=timeout,
                key=key,
                until=SETTLED,
                route=route,
            )
            print_records(report.records, as_json=as_json)
            return exit_code(report.records)
        client = Client(runtime)
        ids = []
        with progress("submitting", total=len(batch)) as advance:
            for item in batch:
                ids.append(await client.submit(declared.name, item, key=key, **route))
                advance()
        if not wait:
            if as_json:
                out.print_json(data=[str(w) for w in ids])
            else:
                out.print("\n".join(str(w) for w in ids), highlight=False)
            return ExitCode.OK
        try:
            await client.wait(ids, timeout=timeout, until=SETTLED)
        except TimeoutError:
            pass  # reported below, with each workflow's status
        records = [await client.get(w) for w in ids]
        print_records(records, as_json=as_json)
        unsettled = [r for r in records if r.status not in SETTLED]
        if unsettled:
            err.print(
                f"orchestrator: error: {len(unsettled)} workflow(s) not finished after "
                f"{timeout:g}s ({', '.join(f'{r.id} {r.status.value}' for r in unsettled)}); "
                "is a worker running? (orchestrator agents) follow with: orchestrator watch "
                f"{unsettled[0].id}",
                markup=False,
                highlight=False,
            )
            return ExitCode.ERROR
        return exit_code(records)

    raise typer.Exit(run_body(opts, body, migrate=False))


def inputs_arg(
    pipeline: Pipeline, text: str | None, path: Path | None, *, as_text: bool = False
) -> list[Any]:
    """The inputs a ``submit`` command line gives: ``--input FILE``; or TEXT, which is
    inline JSON (starting with ``{`` or ``[``), a JSON file (one word that looks like a
    path), or the pipeline's text shorthand. A path that names nothing or a folder is an
    error, never ticket text."""
    if (text is None) == (path is None):
        raise InvalidInput("give either text or --input FILE")
    if path is not None:
        return list(load_inputs(pipeline, path))
    assert text is not None
    stripped = text.strip()
    if not stripped:
        raise InvalidInput("the text is empty")
    if not as_text:
        structured = _json_or_file(pipeline, stripped)
        if structured is not None:
            return structured
    if pipeline.from_text is None:
        raise InvalidInput(f"pipeline {pipeline.name!r} takes no text; give --input FILE")
    try:
        return [pipeline.from_text(stripped)]
    except ValidationError as exc:
        raise InvalidInput(f"invalid input: {exc.errors()[0]['msg']}") from exc


def _json_or_file(pipeline: Pipeline, text: str) -> list[Any] | None:
    """Inputs from ``text`` as inline JSON or as a JSON file's path; None: it is text."""
    if text[0] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            pass  # text that happens to start with a bracket
        else:
            return list(inputs_from_json(pipeline, data, "the inline JSON"))
    if _looks_like_path(text):
        return list(load_inputs(pipeline, _existing_file(text)))
    return None


def _looks_like_path(text: str) -> bool:
    """One word with a folder separator or a file suffix (``.json``): meant as a file."""
    return not any(c.isspace() for c in text) and (
        "/" in text or text.endswith((".json", ".jsonl", ".txt")) or text.startswith("~")
    )


def _existing_file(text: str) -> Path:
    shown = text if len(text) <= 80 else text[:77] + "..."
    path = Path(text).expanduser()
    try:
        if path.is_dir():
            raise InvalidInput(f"{shown} is a folder; give a JSON file, or --text to submit text")
        if not path.is_file():
            raise InvalidInput(f"no such file: {shown} (to submit it as text, add --text)")
    except OSError as exc:  # a name too long for the file system, say
        raise InvalidInput(f"not a usable path: {shown} ({exc.strerror})") from None
    return path
