"""Structured logs: one line per event, JSON when asked, each naming its workflow and step."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.agents.support import sample_tickets
from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.coordination import streams
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.errors import AgentError
from orchestrator.logs import configure
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext
from tests.apps import TICKET, Done, Probe, TicketIn, build_app
from tests.conftest import drop_test_data, runtime_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Log records at INFO as JSON lines, captured (the handler the CLI installs)."""
    out = io.StringIO()
    handler = configure(logging.INFO, "json", stream=out)
    try:
        yield out
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)


def parsed(out: io.StringIO) -> list[dict[str, Any]]:
    """Every captured line, each parsed as JSON (one that does not parse fails the test)."""
    return [json.loads(line) for line in out.getvalue().splitlines()]


def chatty_app() -> App:
    app = App("chatty", version="test")

    @app.agent
    class Chatty(Agent[TicketIn, Done]):
        """Logs as agents do, and fails its first attempt."""

        name = "chatty"
        input_model = TicketIn
        output_model = Done

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            logging.getLogger("tests.chatty").info("looking at %r", data.ticket.subject)
            if ctx.info.attempt == 1:
                raise AgentError("the first try fails")
            return Done(value="ok")

    app.pipeline("chatty", ["chatty"], input_key="ticket")
    return app


async def test_every_line_of_a_step_names_workflow_step_attempt_and_trace(
    settings: Settings, json_lines: io.StringIO
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        async with open_runtime(settings, chatty_app(), tracer_provider=provider) as rt:
            client = Client(rt)
            wid = await client.submit("chatty", TICKET)
            await Worker(rt).run_until_idle(timeout=30)
            record = await client.get(wid)
    finally:
        await drop_test_data(settings)
        provider.shutdown()
    assert record.status is WorkflowStatus.COMPLETED
    spans = exporter.get_finished_spans()
    [submit] = [s for s in spans if s.name == "workflow.submit"]
    steps = {s.attributes["step.attempt"]: s for s in spans if s.name == "step chatty"}  # type: ignore[index]
    lines = [line for line in parsed(json_lines) if line.get("workflow_id") == str(wid)]
    said = [line for line in lines if line["logger"] == "tests.chatty"]
    failed = [line for line in lines if "failure 1/" in line["message"]]
    assert [line["attempt"] for line in said] == [1, 2] and len(failed) == 1
    for line in [*said, *failed]:
        assert line["step_id"] == str(record.steps[0].id) and line["seq"] == 0
        assert line["agent"] == "chatty"
        assert line["trace_id"] == format(submit.context.trace_id, "032x")
        assert line["span_id"] == format(steps[line["attempt"]].context.span_id, "016x")
        assert {"time", "level", "logger", "message"} <= set(line)
    assert failed[0]["level"] == "WARNING" and said[0]["message"] == "looking at 'hello'"


def test_text_lines_name_the_step_too() -> None:
    out = io.StringIO()
    handler = configure(logging.INFO, "text", stream=out)
    try:
        logging.getLogger("tests").info(
            "hello", extra={"workflow_id": "w-1", "seq": 2, "agent": "a", "attempt": 3}
        )
        logging.getLogger("tests").info("no step")
    finally:
        logging.getLogger().removeHandler(handler)
        logging.getLogger().setLevel(logging.WARNING)
    first, second = out.getvalue().splitlines()
    assert first.endswith("INFO tests: hello [workflow=w-1 step=2 agent=a attempt=3]")
    assert second.endswith("INFO tests: no step")


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    fast = settings.model_copy(update={"lease_seconds": 0.3, "stall_seconds": 0.2})
    async with runtime_for(fast, build_app(probe)) as runtime:
        yield runtime


async def test_a_reclaim_is_logged_at_info_with_the_workflow(
    rt: Runtime, probe: Probe, json_lines: io.StringIO
) -> None:
    probe.gate.set()
    dead, alive = Worker(rt, concurrency=1), Worker(rt, concurrency=1)
    wid = await Client(rt).submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    await streams.read(rt.redis, rt.keys, "gated", dead.consumer, count=1, block_ms=1000)
    await anyio.sleep(rt.settings.lease_seconds + 0.05)  # the worker that took it died
    _, [entry] = await streams.reclaim(
        rt.redis, rt.keys, "gated", alive.consumer, min_idle_ms=300, count=1
    )
    await alive.process("gated", entry, takeover=True)
    [line] = [line for line in parsed(json_lines) if "taking over" in line["message"]]
    assert line["level"] == "INFO" and str(wid) in line["message"]
    assert line["workflow_id"] == str(wid) and line["attempt"] == 2 and line["agent"] == "gated"


async def test_a_reconciler_requeue_is_logged_at_info_with_the_workflow(
    rt: Runtime, probe: Probe, json_lines: io.StringIO
) -> None:
    wid = await Client(rt).submit("gated", TICKET)
    keys = [k async for k in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*")]
    await rt.redis.delete(*keys)  # Redis lost the envelope
    await anyio.sleep(rt.settings.stall_after + 0.05)
    assert (await Reconciler(rt).pass_once()).requeued == 1
    [line] = [line for line in parsed(json_lines) if "re-enqueued as attempt" in line["message"]]
    assert line["level"] == "INFO" and str(wid) in line["message"]
    assert line["workflow_id"] == str(wid) and line["attempt"] == 2 and line["seq"] == 0


def _worker(env: dict[str, str], **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", "--concurrency", "2"],
        env={**env, **extra},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_cli_worker_logs_a_takeover_as_json(
    settings: Settings, cli_env: dict[str, str]
) -> None:
    from orchestrator.agents.support import app

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | cli_env
    async with open_runtime(settings, app) as runtime:
        client = Client(runtime)
        doomed = _worker(
            env, ORCHESTRATOR_CRASH_AT="after_tool_effect", ORCHESTRATOR_CRASH_AFTER="1"
        )
        wid = await client.submit(None, sample_tickets()[0])
        assert await anyio.to_thread.run_sync(lambda: doomed.wait(60)) == -9  # SIGKILL'd
        doomed.communicate()
        heir = _worker(env, ORCHESTRATOR_LOG_FORMAT="json", ORCHESTRATOR_LOG_LEVEL="INFO")
        try:
            statuses = await client.wait([wid], timeout=60)
        finally:
            heir.terminate()
            _, stderr = heir.communicate(timeout=30)
    assert statuses[wid] is WorkflowStatus.COMPLETED, stderr
    # Every log line is one JSON object (the start-up banner is not a log record).
    lines = [json.loads(t) for t in stderr.splitlines() if not t.startswith("worker ")]
    taken = [line for line in lines if "taking over as attempt" in line["message"]]
    assert taken and all(line["workflow_id"] == str(wid) for line in taken), stderr
    assert taken[0]["level"] == "INFO" and str(wid) in taken[0]["message"]
