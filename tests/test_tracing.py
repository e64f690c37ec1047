"""One OpenTelemetry trace follows a ticket from submit through every step and tool,
across worker processes, requeues and resumes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator import tracing
from orchestrator.agents.support import sample_tickets
from orchestrator.cli.demo import run_local
from orchestrator.client import Client
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.runtime import open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from tests.apps import TICKET, Probe, build_app
from tests.conftest import drop_test_data

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


async def test_a_ticket_is_one_trace_across_steps_and_tools(settings: Settings) -> None:
    from orchestrator.agents.support import app

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    ticket = next(t for t in sample_tickets() if "ORD-10007" in t.body)
    try:
        async with open_runtime(settings, app, tracer_provider=provider) as runtime:
            report = await run_local(runtime, [ticket], timeout=30)
    finally:
        await drop_test_data(settings)
        provider.shutdown()
    assert report.completed == 1
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert {
        "workflow.submit",
        "step triage",
        "step research",
        "step response",
        "tool lookup_order",
    } <= set(spans)
    assert len({s.context.trace_id for s in exporter.get_finished_spans()}) == 1

    def parent(name: str) -> str:
        parent_id = spans[name].parent.span_id  # type: ignore[union-attr]
        return next(n for n, s in spans.items() if s.context.span_id == parent_id)

    assert parent("step triage") == "workflow.submit"
    assert parent("step research") == "step triage"
    # research forked; the response joined under the branch that ended last.
    assert parent("step order_lookup") == parent("step knowledge_search") == "step research"
    assert parent("step response") in {"step order_lookup", "step knowledge_search"}
    assert parent("tool lookup_order") == "step order_lookup"
    key = spans["tool lookup_order"].attributes["tool.idempotency_key"]
    assert key.endswith((":2:0", ":3:0"))  # the branches took step numbers 2 and 3


@contextlib.contextmanager
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield provider, exporter
    finally:
        provider.shutdown()


def _cli_worker(env: dict[str, str], agents: str, spans: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", "--agents", agents],
        env={
            **env,
            "ORCHESTRATOR_TRACES_EXPORTER": "file",
            "ORCHESTRATOR_TRACES_FILE": str(spans),
        },
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_steps_in_two_worker_processes_are_parent_and_child(
    settings: Settings, cli_env: dict[str, str], tmp_path: Path
) -> None:
    from orchestrator.agents.support import app

    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"} | cli_env
    first, rest = tmp_path / "triage.jsonl", tmp_path / "rest.jsonl"
    with traced() as (provider, exporter):
        async with open_runtime(settings, app, tracer_provider=provider) as runtime:
            workers = [
                _cli_worker(env, "triage", first),
                _cli_worker(env, "research,order_lookup,knowledge_search,response", rest),
            ]
            try:
                client = Client(runtime)
                ticket = next(t for t in sample_tickets() if "ORD-10007" in t.body)
                wid = await client.submit(None, ticket)
                statuses = await client.wait([wid], timeout=60)
            finally:
                for w in workers:
                    w.terminate()
                output = [w.communicate(timeout=30)[0].decode() for w in workers]
        [submit] = exporter.get_finished_spans()
    assert statuses[wid] is WorkflowStatus.COMPLETED, output
    assert [w.returncode for w in workers] == [0, 0], output
    by_file = {path: _read_spans(path) for path in (first, rest)}
    spans = [s for found in by_file.values() for s in found]
    ids = {s["context"]["span_id"]: s for s in spans}
    steps = {
        s["attributes"]["step.agent"]: s
        for s in spans
        if s["name"].startswith("step ") and s["attributes"].get("workflow.id") == str(wid)
    }
    assert set(steps) == {"triage", "research", "order_lookup", "knowledge_search", "response"}
    assert {s["name"] for s in by_file[first] if s["name"].startswith("step ")} == {"step triage"}

    def parent(agent: str) -> str:
        parent_span = ids.get(steps[agent]["parent_id"])
        return parent_span["attributes"]["step.agent"] if parent_span else "?"

    trace_id = f"0x{submit.context.trace_id:032x}"
    assert {s["context"]["trace_id"] for s in spans} == {trace_id}  # one trace, both files
    assert steps["triage"]["parent_id"] == f"0x{submit.context.span_id:016x}"
    assert parent("research") == "triage"
    assert parent("order_lookup") == parent("knowledge_search") == "research"
    assert parent("response") in {"order_lookup", "knowledge_search"}
    # Two processes: each span names the one that made it.
    triage_at = steps["triage"]["resource"]["attributes"]
    research_at = steps["research"]["resource"]["attributes"]
    assert triage_at["service.instance.id"] != research_at["service.instance.id"]
    assert triage_at["process.pid"] != research_at["process.pid"]
    assert {triage_at["process.pid"], research_at["process.pid"]} == {w.pid for w in workers}
    # Claim, completion, model calls and recalls are spans of the step they belong to.
    children: dict[str, set[str]] = {}
    for s in spans:
        owner = ids.get(s["parent_id"] or "")
        if owner is not None and owner["name"].startswith("step "):
            children.setdefault(owner["attributes"]["step.agent"], set()).add(s["name"])
    assert {"step.claim", "step.complete", "model triage"} <= children["triage"]
    assert "memory.recall" in children["research"]
    [model] = [s for s in by_file[first] if s["name"] == "model triage"]
    assert model["attributes"]["gen_ai.request.model"].startswith("offline-rules")
    assert model["attributes"]["gen_ai.usage.input_tokens"] == 0  # the offline model
    recall = next(s for s in spans if s["name"] == "memory.recall")
    assert recall["attributes"]["memory.k"] >= 1 and "memory.cached" in recall["attributes"]


@pytest.fixture
def probe() -> Probe:
    return Probe()


def _trace_of(exporter: InMemorySpanExporter, name: str) -> list[tuple[int, int | None]]:
    """(trace id, parent span id) of every finished span called ``name``."""
    return [
        (s.context.trace_id, s.parent.span_id if s.parent else None)
        for s in exporter.get_finished_spans()
        if s.name == name
    ]


async def test_a_reconciler_requeue_stays_in_the_workflow_trace(
    settings: Settings, probe: Probe
) -> None:
    probe.gate.set()
    fast = settings.model_copy(update={"lease_seconds": 0.3, "stall_seconds": 0.2})
    with traced() as (provider, exporter):
        try:
            async with open_runtime(fast, build_app(probe), tracer_provider=provider) as rt:
                wid = await Client(rt).submit("gated", TICKET)
                keys = [k async for k in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*")]
                await rt.redis.delete(*keys)  # Redis lost the envelope and its traceparent
                await anyio.sleep(fast.stall_after + 0.05)
                assert (await Reconciler(rt).pass_once()).requeued == 1
                await Worker(rt, reconcile=False).run_until_idle(timeout=30)
                assert (await Client(rt).get(wid)).status is WorkflowStatus.COMPLETED
        finally:
            await drop_test_data(fast)
        [(trace_id, submit_span)] = [
            (s.context.trace_id, s.context.span_id)
            for s in exporter.get_finished_spans()
            if s.name == "workflow.submit"
        ]
        assert _trace_of(exporter, "step gated") == [(trace_id, submit_span)]


async def test_resume_stays_in_the_workflow_trace(settings: Settings, probe: Probe) -> None:
    with traced() as (provider, exporter):
        try:
            async with open_runtime(settings, build_app(probe), tracer_provider=provider) as rt:
                probe.failures_left = rt.settings.max_attempts
                client = Client(rt)
                wid = await client.submit("flaky", TICKET)
                await Worker(rt).run_until_idle(timeout=30)
                assert (await client.get(wid)).status is WorkflowStatus.FAILED
                assert await client.resume(wid) == 1
                await Worker(rt).run_until_idle(timeout=30)
                assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
        finally:
            await drop_test_data(settings)
        [submit] = [s for s in exporter.get_finished_spans() if s.name == "workflow.submit"]
        runs = _trace_of(exporter, "step flaky")
        assert len(runs) == rt.settings.max_attempts + 1
        assert set(runs) == {(submit.context.trace_id, submit.context.span_id)}


def test_spans_are_started_only_where_they_go_somewhere() -> None:
    """With no provider given nor set globally, no span is started: the no-op one would only
    make the current span current again. A given provider gets its spans; a recording span
    of the caller's never takes the runtime's attributes."""
    quiet = tracing.tracer()
    assert tracing.silent(quiet)
    with tracing.child(quiet, "step.claim", {"step.takeover": False}) as skipped:
        assert skipped is trace.get_current_span() and not skipped.is_recording()

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    loud = tracing.tracer(provider)
    assert not tracing.silent(loud)
    with loud.start_as_current_span("the caller's") as callers:
        assert not tracing.silent(quiet)  # a recording span is current
        with tracing.child(quiet, "step.claim", {"step.takeover": True}) as inner:
            assert inner is not callers and not inner.is_recording()
        with tracing.child(loud, "step.complete", {"step.takeover": True}):
            pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["step.complete", "the caller's"]
    assert dict(spans["step.complete"].attributes or {}) == {"step.takeover": True}
    assert not spans["the caller's"].attributes
