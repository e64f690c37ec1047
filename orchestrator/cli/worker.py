"""``orchestrator worker``: run workers for the app's agents until SIGINT/SIGTERM."""

import logging
from typing import Annotated

import anyio
import typer

from orchestrator.cli.support import Options, err, guard
from orchestrator.engine.worker import Worker
from orchestrator.errors import ConfigurationError, ServiceUnavailable
from orchestrator.runtime import open_runtime
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
        workers: list[Worker] = []

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    for w in workers:
                        w.stop()
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(on_signal)
            delay = 0.5
            while not stop.is_set():
                try:
                    async with open_runtime(
                        opts.settings,
                        app,
                        apply_migrations=False,
                        tracer_provider=telemetry.tracer_provider,
                        meter_provider=telemetry.meter_provider,
                    ) as rt:
                        w = Worker(rt, agents=names, concurrency=concurrency)
                        workers.append(w)
                        err.print(
                            f"worker {w.consumer}: agents {', '.join(w.agents)}, "
                            f"model {rt.model.name}"
                        )
                        await w.run()
                    break
                except ServiceUnavailable as exc:
                    # Started during an outage: wait for the servers, as a running worker does.
                    if not exc.retryable or workers:
                        raise
                    logging.getLogger("orchestrator.worker").warning(
                        "%s; retrying in %.1fs", exc, delay
                    )
                with anyio.move_on_after(delay):
                    await stop.wait()
                delay = min(delay * 2, 10.0)
            tg.cancel_scope.cancel()

    with open_telemetry(opts.settings, metrics_port=metrics_port, serve_metrics=True) as telemetry:
        anyio.run(main)
