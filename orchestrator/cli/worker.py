"""``orchestrator worker``: run workers for the app's agents until SIGINT/SIGTERM."""

import logging
from collections.abc import Sequence
from typing import Annotated

import anyio
import typer
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from orchestrator.app import App
from orchestrator.cli.support import Options, err, guard
from orchestrator.engine.worker import Worker
from orchestrator.errors import ConfigurationError, ServiceUnavailable
from orchestrator.runtime import open_runtime
from orchestrator.settings import Settings
from orchestrator.telemetry import open_telemetry


@guard
def worker(
    ctx: typer.Context,
    agents: Annotated[str | None, typer.Option(help="comma-separated agents (default all)")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", min=1, max=65535, help="serve Prometheus metrics on this port"
        ),
    ] = None,
) -> None:
    """Run workers until SIGINT/SIGTERM (in-flight steps finish first)."""
    import signal

    names = [a.strip() for a in agents.split(",") if a.strip()] if agents else None
    if ctx.obj.settings.redis_url is None:
        # An embedded Redis is private to one process: no one else could give this worker work.
        raise ConfigurationError(
            "worker needs REDIS_URL (and DATABASE_URL) shared with the submitters; "
            "for a single-process run use `orchestrator demo` or `orchestrator submit`"
        )

    opts: Options = ctx.obj
    app = opts.app()

    async def main() -> None:
        stop = anyio.Event()

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signal)
            await serve(
                opts.settings,
                app,
                stop,
                agents=names,
                concurrency=concurrency,
                tracer_provider=telemetry.tracer_provider,
                meter_provider=telemetry.meter_provider,
            )
            tg.cancel_scope.cancel()

    with open_telemetry(opts.settings, metrics_port=metrics_port, serve_metrics=True) as telemetry:
        anyio.run(main)


async def serve(
    settings: Settings,
    app: App,
    stop: anyio.Event,
    *,
    agents: Sequence[str] | None = None,
    concurrency: int = 8,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Run a worker until ``stop`` is set, waiting out servers that are down at start.

    ``stop`` is a level, not an edge: set while the runtime is still opening (a
    SIGTERM right after start), it stops the worker as soon as it exists."""
    delay, started = 0.5, False
    while not stop.is_set():
        try:
            async with open_runtime(
                settings,
                app,
                apply_migrations=False,
                tracer_provider=tracer_provider,
                meter_provider=meter_provider,
            ) as rt:
                w = Worker(rt, agents=agents, concurrency=concurrency)
                started = True
                err.print(
                    f"worker {w.consumer}: agents {', '.join(w.agents)}, model {rt.model.name}"
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_stop_when_set, stop, w)
                    await w.run()
                    tg.cancel_scope.cancel()
            return
        except ServiceUnavailable as exc:
            # Started during an outage: wait for the servers, as a running worker does.
            if not exc.retryable or started:
                raise
            logging.getLogger("orchestrator.worker").warning("%s; retrying in %.1fs", exc, delay)
        with anyio.move_on_after(delay):
            await stop.wait()
        delay = min(delay * 2, 10.0)


async def _stop_when_set(stop: anyio.Event, worker: Worker) -> None:
    await stop.wait()
    worker.stop()
