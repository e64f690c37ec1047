"""Metrics: the runtime's instruments read back after real workflows on real servers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from orchestrator.agents.support import sample_tickets
from orchestrator.app import App
from orchestrator.cli.demo import run_local
from orchestrator.client import Client
from orchestrator.coordination import streams
from orchestrator.engine.reconciler import Reconciler
from orchestrator.engine.worker import Worker
from orchestrator.errors import ConfigurationError
from orchestrator.metrics import STEP_BUCKETS
from orchestrator.models.llm import (
    Completion,
    LanguageModel,
    ModelRequest,
    T,
    ToolDef,
    ToolRunner,
    Usage,
)
from orchestrator.models.pricing import Pricing
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import ModelPrice, Settings
from orchestrator.telemetry import open_telemetry
from tests.apps import TICKET, Probe, build_app
from tests.conftest import drop_test_data, fetch

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def metered(
    settings: Settings, app: App
) -> AsyncIterator[tuple[Runtime, InMemoryMetricReader]]:
    """A runtime whose metrics go to an in-memory reader."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        async with open_runtime(settings, app, meter_provider=provider) as runtime:
            yield runtime, reader
    finally:
        await drop_test_data(settings)
        provider.shutdown()


def points(reader: InMemoryMetricReader, name: str) -> list[tuple[dict[str, Any], Any]]:
    """The data points of metric ``name``: (attributes, point)."""
    data = reader.get_metrics_data()
    found = []
    for resource in data.resource_metrics if data else []:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    found += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def by(reader: InMemoryMetricReader, name: str, *keys: str) -> dict[tuple[Any, ...], float]:
    """Values of a counter (sum) or histogram (count), keyed by the attributes ``keys``."""
    totals: dict[tuple[Any, ...], float] = {}
    for attributes, point in points(reader, name):
        key = tuple(attributes.get(k) for k in keys)
        value = point.count if hasattr(point, "count") else point.value
        totals[key] = totals.get(key, 0) + value
    return totals


class MeteredModel:
    """The offline model's answers, each reported as 100 prompt and 20 completion tokens."""

    def __init__(self, inner: LanguageModel) -> None:
        self.inner = inner
        self.name = "metered-offline"

    async def complete(
        self,
        request: ModelRequest,
        output: type[T],
        tools: Sequence[ToolDef] = (),
        run_tool: ToolRunner | None = None,
        max_turns: int = 6,
    ) -> Completion[T]:
        done = await self.inner.complete(request, output, tools, run_tool, max_turns)
        return Completion(done.value, Usage(100, 20))


async def test_support_run_reports_steps_tools_and_model_use(settings: Settings) -> None:
    from orchestrator.agents.support import app

    tickets = sample_tickets()[:4]
    async with metered(settings, app) as (runtime, reader):
        # $1 per million prompt tokens, $2 per million completion tokens
        pricing = Pricing({"metered-offline": ModelPrice(input=Decimal(1), output=Decimal(2))})
        runtime = dataclasses.replace(runtime, model=MeteredModel(runtime.model), pricing=pricing)
        report = await run_local(runtime, tickets, timeout=60)
        assert report.completed == len(tickets)
        ran = await fetch(runtime, "SELECT agent, count(*) AS n FROM steps GROUP BY agent")
        tools = await fetch(runtime, "SELECT tool, count(*) AS n FROM tool_runs GROUP BY tool")
        calls = await fetch(
            runtime,
            """SELECT w.tenant_id, sum(a.model_calls) AS n FROM step_attempts a
               JOIN steps s ON s.id = a.step_id JOIN workflows w ON w.id = s.workflow_id
               GROUP BY w.tenant_id""",
        )
    per_agent = {(r["agent"],): r["n"] for r in ran}
    assert by(reader, "orchestrator.step.attempts", "agent") == per_agent
    assert by(reader, "orchestrator.step.duration", "agent") == per_agent
    assert set(by(reader, "orchestrator.step.duration", "outcome")) == {("completed",)}
    _, duration = points(reader, "orchestrator.step.duration")[0]
    assert tuple(duration.explicit_bounds) == STEP_BUCKETS  # seconds, not the SDK's ms
    executed = {(r["tool"], False): r["n"] for r in tools}
    assert executed and by(reader, "orchestrator.tool.calls", "tool", "replayed") == executed
    model_calls = {(r["tenant_id"], "metered-offline"): r["n"] for r in calls if r["n"]}
    assert model_calls and by(reader, "orchestrator.model.calls", "tenant", "model") == model_calls
    tokens = by(reader, "orchestrator.model.tokens", "tenant", "type")
    for (tenant, _), n in model_calls.items():
        assert tokens[(tenant, "prompt")] == 100 * n
        assert tokens[(tenant, "completion")] == 20 * n
    cost = by(reader, "orchestrator.model.cost", "tenant")
    for (tenant, _), n in model_calls.items():
        assert cost[(tenant,)] == pytest.approx(n * (100 * 1 + 20 * 2) / 1e6)
    # The worker measured its groups' backlog, and the consolidator its lag.
    assert {a["group"] for a, _ in points(reader, "orchestrator.stream.pending")} == set(app.agents)
    assert points(reader, "orchestrator.consolidation.stream_lag")


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def protocol(
    settings: Settings, probe: Probe
) -> AsyncIterator[tuple[Runtime, InMemoryMetricReader]]:
    fast = settings.model_copy(update={"lease_seconds": 0.3, "stall_seconds": 0.2})
    async with metered(fast, build_app(probe)) as pair:
        yield pair


async def test_retries_replays_and_dead_letters(
    protocol: tuple[Runtime, InMemoryMetricReader], probe: Probe
) -> None:
    rt, reader = protocol
    probe.failures_left = 1
    client = Client(rt)
    flaky = await client.submit("flaky", TICKET)
    refused = await client.submit("refuses", TICKET)
    await Worker(rt, concurrency=2).run_until_idle(timeout=30)
    assert (await client.get(flaky)).status is WorkflowStatus.COMPLETED
    assert (await client.get(refused)).status is WorkflowStatus.FAILED
    assert by(reader, "orchestrator.step.duration", "agent", "outcome") == {
        ("flaky", "retried"): 1,
        ("flaky", "completed"): 1,
        ("refuses", "failed"): 1,
    }
    assert by(reader, "orchestrator.step.attempts", "agent") == {("flaky",): 2, ("refuses",): 1}
    assert by(reader, "orchestrator.step.retries", "agent") == {("flaky",): 1}
    assert by(reader, "orchestrator.dead_letters", "agent") == {("refuses",): 1}
    # The retry found both calls of the failed attempt recorded: replayed, not run again.
    assert by(reader, "orchestrator.tool.calls", "tool", "replayed") == {
        ("lookup", False): 1,
        ("lookup", True): 1,
        ("charge", False): 1,
        ("charge", True): 1,
    }
    assert probe.calls["lookup"] == probe.calls["charge"] == 1


async def test_takeover_time_after_a_reclaim(
    protocol: tuple[Runtime, InMemoryMetricReader], probe: Probe
) -> None:
    rt, reader = protocol
    probe.gate.set()
    dead, alive = Worker(rt, concurrency=1), Worker(rt, concurrency=1)
    wid = await Client(rt).submit("gated", TICKET)
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    taken = await streams.read(rt.redis, rt.keys, "gated", dead.consumer, count=1, block_ms=1000)
    assert len(taken) == 1  # delivered to a worker that then dies without acknowledging
    await anyio.sleep(rt.settings.lease_seconds + 0.05)
    _, reclaimed = await streams.reclaim(
        rt.redis, rt.keys, "gated", alive.consumer, min_idle_ms=300, count=5
    )
    assert reclaimed[0].idle_ms is not None and reclaimed[0].idle_ms >= 300
    await alive.process("gated", reclaimed[0], takeover=True)
    assert (await Client(rt).get(wid)).status is WorkflowStatus.COMPLETED
    [(attributes, point)] = points(reader, "orchestrator.takeover.duration")
    assert attributes == {"agent": "gated", "via": "reclaim"}
    assert point.count == 1 and point.sum >= rt.settings.lease_seconds


async def test_reconciler_requeues_and_their_takeover_time(
    protocol: tuple[Runtime, InMemoryMetricReader], probe: Probe
) -> None:
    rt, reader = protocol
    client = Client(rt)
    for _ in range(3):
        await client.submit("gated", TICKET)
    keys = [k async for k in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*")]
    await rt.redis.delete(*keys)  # Redis lost every envelope
    await anyio.sleep(rt.settings.stall_after + 0.05)
    assert (await Reconciler(rt).pass_once()).requeued == 3
    assert by(reader, "orchestrator.reconciler.requeues", "agent") == {("gated",): 3}
    [(attributes, point)] = points(reader, "orchestrator.takeover.duration")
    assert attributes == {"agent": "gated", "via": "requeue"}
    assert point.count == 3 and point.min >= rt.settings.stall_after


async def test_stream_gauges_follow_lag_and_pending(
    protocol: tuple[Runtime, InMemoryMetricReader], probe: Probe
) -> None:
    rt, reader = protocol
    client, worker = Client(rt), Worker(rt, agents=["gated"])
    await streams.ensure_group(rt.redis, rt.keys, "gated")
    for _ in range(2):
        await client.submit("gated", TICKET)

    def gauges() -> tuple[int, int]:
        [(_, lag)] = points(reader, "orchestrator.stream.lag")
        [(_, pending)] = points(reader, "orchestrator.stream.pending")
        return lag.value, pending.value

    await worker._measure_streams()
    assert gauges() == (2, 0)
    await streams.read(rt.redis, rt.keys, "gated", worker.consumer, count=1, block_ms=100)
    await worker._measure_streams()
    assert gauges() == (1, 1)


def test_otlp_exporter_missing_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("metric_exporter", "trace_exporter"):
        # A None entry makes the import fail, as when the extra is not installed.
        monkeypatch.setitem(sys.modules, f"opentelemetry.exporter.otlp.proto.http.{module}", None)
    with pytest.raises(ConfigurationError, match=r"durable-agents-runtime\[otlp\]"):
        with open_telemetry(Settings(metrics_exporter="otlp")):
            pass
    with pytest.raises(ConfigurationError, match=r"\[otlp\]"):
        with open_telemetry(Settings(traces_exporter="otlp")):
            pass


def test_metrics_exporters_by_setting() -> None:
    with open_telemetry(Settings()) as none:
        assert none.meter_provider is None and none.tracer_provider is None
    with open_telemetry(Settings(metrics_exporter="console")) as console:
        assert console.meter_provider is not None
    # Only a worker serves the scrape endpoint: a short command gets no metrics.
    with open_telemetry(Settings(metrics_exporter="prometheus")) as command:
        assert command.meter_provider is None
    with pytest.raises(ConfigurationError, match="ORCHESTRATOR_TRACES_FILE"):
        with open_telemetry(Settings(traces_exporter="file")):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def cli_worker(env: dict[str, str], *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``orchestrator worker ARGS`` as a subprocess, stopped with SIGTERM on exit."""
    full = {k: v for k, v in os.environ.items() if k not in {"OPENAI_API_KEY"}}
    worker = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "worker", *args],
        env={**full, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield worker
    finally:
        worker.terminate()
        worker.communicate(timeout=30)


async def scrape(port: int, until: str, timeout: float = 30) -> str:
    """GET /metrics until its text holds ``until`` (the first export may come late)."""
    text = ""
    with anyio.move_on_after(timeout):
        while until not in text:
            try:
                text = await anyio.to_thread.run_sync(
                    lambda: (
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
                        .read()
                        .decode()
                    )
                )
            except OSError:
                pass
            if until not in text:
                await anyio.sleep(0.2)
    return text


async def test_worker_serves_prometheus_metrics(
    settings: Settings, cli_env: dict[str, str]
) -> None:
    from orchestrator.agents.support import app

    port = free_port()
    env = {**cli_env, "ORCHESTRATOR_METRICS_HOST": "127.0.0.1"}
    async with open_runtime(settings, app) as runtime:  # migrated; cli_env drops it after
        with cli_worker(env, "--metrics-port", str(port)) as worker:
            client = Client(runtime)
            wid = await client.submit(None, sample_tickets()[0])
            statuses = await client.wait([wid], timeout=60)
            text = await scrape(port, 'orchestrator_step_duration_seconds_count{agent="response"')
        assert statuses[wid] is WorkflowStatus.COMPLETED
    assert worker.returncode == 0
    lines = text.splitlines()
    triage = [line for line in lines if line.startswith("orchestrator_step_attempts_total{")]
    assert any('agent="triage"' in line and line.endswith(" 1.0") for line in triage), text
    assert any(line.startswith("orchestrator_stream_pending{") for line in lines), text
