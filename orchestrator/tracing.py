"""OpenTelemetry tracing: one trace follows a ticket across processes.

The submit span's W3C ``traceparent`` rides on the first envelope; each step
runs in a span that is a child of it and hands its own ``traceparent`` to the
next envelopes, so submit → triage → research → response form one trace even
when different workers run them. Each step row keeps the traceparent its span
starts under (``steps.traceparent``), so an envelope rebuilt from Postgres (a
reconciler requeue, ``resume``, a woken wait, a session's next ticket) stays in
the workflow's trace. Inside a step's span: ``step.claim``, ``step.complete`` (or
``step.fail``, ``step.park``), ``model <purpose>`` per model call (model and
tokens, ``gen_ai.*``), ``memory.recall`` per recall and ``tool <name>`` per tool
call. Spans go to the TracerProvider given to ``open_runtime`` (see
``orchestrator.telemetry``), else the globally configured one (none: then they
cost next to nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def tracer(provider: TracerProvider | None = None) -> Tracer:
    """The runtime's tracer, from ``provider`` or the globally configured one."""
    return trace.get_tracer("orchestrator", tracer_provider=provider)


def traceparent_of(span: Span) -> str | None:
    """The W3C traceparent of ``span``, to carry on an envelope."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def parent_context(traceparent: str | None) -> Context | None:
    """The context a W3C ``traceparent`` carries, or None (a new trace) when there is none."""
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


@contextmanager
def span(t: Tracer, name: str, *, parent: str | None = None, **attributes: Any) -> Iterator[Span]:
    """A span under the envelope's ``parent`` traceparent (a new trace when there is none)."""
    if parent is None and silent(t):
        yield trace.get_current_span()
        return
    with t.start_as_current_span(
        name, context=parent_context(parent), attributes=attributes
    ) as current:
        yield current


@contextmanager
def child(t: Tracer, name: str, attributes: dict[str, Any] | None = None) -> Iterator[Span]:
    """A span under the current one (the step's): ``step.claim``, ``tool <name>``..."""
    if silent(t):
        yield trace.get_current_span()
        return
    with t.start_as_current_span(name, attributes=attributes) as current:
        yield current


def silent(t: Tracer) -> bool:
    """Whether ``t``'s spans would go nowhere and change nothing: no provider was given to
    the runtime nor set globally, and no recording span is current. Then a span is not
    started at all; the no-op one would only make the current span current again, at
    about 5 % of a worker's CPU (py-spy, ``benchmarks/pipeline.py --app noop``)."""
    unset = isinstance(t, trace.NoOpTracer) or (
        isinstance(t, trace.ProxyTracer)
        and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    )
    return unset and not trace.get_current_span().is_recording()
