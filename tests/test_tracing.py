"""One OpenTelemetry trace follows a ticket from submit through every step and tool."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from orchestrator.agents.support import sample_tickets
from orchestrator.cli.demo import run_local
from orchestrator.runtime import open_runtime
from orchestrator.settings import Settings
from tests.conftest import drop_test_data

pytestmark = pytest.mark.anyio


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
