"""Where spans and metrics go: the exporters the settings choose, opened and closed together.

``open_telemetry(settings)`` builds a TracerProvider and a MeterProvider for one
process and hands them to ``open_runtime``; nothing is installed globally. By
default neither exists: metrics go nowhere (``Runtime.metrics`` is then no-op) and
spans go to whatever provider the application configured globally.

* ``ORCHESTRATOR_METRICS_EXPORTER``: ``none`` (default), ``console`` (printed every
  ``ORCHESTRATOR_METRICS_INTERVAL_SECONDS``), ``otlp`` (OTLP over HTTP, the ``[otlp]``
  extra; endpoint and headers from the standard ``OTEL_EXPORTER_OTLP_*`` variables),
  ``prometheus`` (a scrape endpoint on ``ORCHESTRATOR_METRICS_HOST``:
  ``ORCHESTRATOR_METRICS_PORT``, served by workers only: ``orchestrator worker
  --metrics-port 9464`` turns it on).
* ``ORCHESTRATOR_TRACES_EXPORTER``: ``none`` (default), ``console``, ``otlp`` (the
  ``[otlp]`` extra), ``file`` (one JSON object per span and line, appended to
  ``ORCHESTRATOR_TRACES_FILE``).

Every span and metric carries ``service.name`` ``orchestrator`` and a
``service.instance.id`` (host and pid) naming the process.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)

from orchestrator.errors import ConfigurationError
from orchestrator.settings import Settings

OTLP_HINT = "install the OTLP exporter: pip install 'durable-agents-runtime[otlp]'"


@dataclass(frozen=True, slots=True)
class Telemetry:
    """The providers to pass to ``open_runtime`` (None: not configured)."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None


def resource() -> Resource:
    """This process as OpenTelemetry names it: the service and its instance (host, pid)."""
    return Resource.create(
        {
            "service.name": "orchestrator",
            "service.instance.id": f"{socket.gethostname()}-{os.getpid()}",
            "process.pid": os.getpid(),
        }
    )


@contextlib.contextmanager
def open_telemetry(
    settings: Settings, *, metrics_port: int | None = None, serve_metrics: bool = False
) -> Iterator[Telemetry]:
    """The providers the settings ask for, shut down (flushed) on exit.

    ``serve_metrics``: this process may serve the Prometheus endpoint (a worker; a short
    command never does). ``metrics_port`` (``worker --metrics-port``) serves it on that
    port whatever ``metrics_exporter`` says. ConfigurationError when an exporter's package
    is missing, the traces file is not set, or the port cannot be bound.
    """
    with contextlib.ExitStack() as stack:
        res = resource()
        tracer_provider = _tracer_provider(settings, res, stack)
        reader = _metric_reader(settings, metrics_port, serve_metrics, stack)
        meter_provider = None
        if reader is not None:
            meter_provider = MeterProvider(resource=res, metric_readers=[reader])
            stack.callback(meter_provider.shutdown)
        if tracer_provider is not None:
            stack.callback(tracer_provider.shutdown)
        yield Telemetry(tracer_provider, meter_provider)


def _tracer_provider(
    settings: Settings, res: Resource, stack: contextlib.ExitStack
) -> TracerProvider | None:
    kind = settings.traces_exporter
    if kind == "none":
        return None
    processor: SpanProcessor
    if kind == "console":
        processor = BatchSpanProcessor(ConsoleSpanExporter())
    elif kind == "otlp":
        processor = BatchSpanProcessor(_otlp("trace_exporter", "OTLPSpanExporter"))
    else:
        processor = SimpleSpanProcessor(_file_exporter(settings.traces_file, stack))
    provider = TracerProvider(resource=res)
    provider.add_span_processor(processor)
    return provider


def _file_exporter(path: Path | None, stack: contextlib.ExitStack) -> ConsoleSpanExporter:
    """Spans appended to ``path``, one JSON object per line (written as each span ends,
    so a killed process loses none it finished)."""
    if path is None:
        raise ConfigurationError(
            "ORCHESTRATOR_TRACES_EXPORTER=file needs ORCHESTRATOR_TRACES_FILE (a path)"
        )
    try:
        out = stack.enter_context(path.open("a", encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot write traces to {path}: {exc.strerror}") from exc

    def line(span: ReadableSpan) -> str:
        return f"{span.to_json(indent=None)}\n"

    return ConsoleSpanExporter(out=out, formatter=line)


def _metric_reader(
    settings: Settings, port: int | None, serve: bool, stack: contextlib.ExitStack
) -> MetricReader | None:
    kind = "prometheus" if port is not None else settings.metrics_exporter
    interval_ms = settings.metrics_interval_seconds * 1000
    if kind == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter(), interval_ms)
    if kind == "otlp":
        exporter = _otlp("metric_exporter", "OTLPMetricExporter")
        return PeriodicExportingMetricReader(exporter, interval_ms)
    if kind == "prometheus" and serve:
        return _prometheus(settings.metrics_host, port or settings.metrics_port, stack)
    return None


def _prometheus(host: str, port: int, stack: contextlib.ExitStack) -> MetricReader:
    """A reader serving ``/metrics`` on ``host:port`` from its own registry (with the
    process's CPU, memory and GC collectors), stopped on exit."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        ProcessCollector,
        start_http_server,
    )

    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    reader = PrometheusMetricReader(registry=registry)
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    return reader


def _otlp(module: str, name: str) -> Any:
    """An OTLP/HTTP exporter (endpoint and headers from ``OTEL_EXPORTER_OTLP_*``), or a
    ConfigurationError naming the extra to install."""
    import importlib

    try:
        found = importlib.import_module(f"opentelemetry.exporter.otlp.proto.http.{module}")
    except ImportError as exc:
        raise ConfigurationError(f"the otlp exporter is not installed: {OTLP_HINT}") from exc
    return getattr(found, name)()
