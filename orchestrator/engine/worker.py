"""The worker: feeds stream entries to the step protocol (``orchestrator.protocol``).

Per agent, one reader fills up to ``concurrency`` slots with XREADGROUP. Beside
the readers, each in a loop that waits out any Redis or Postgres outage
(logged once, resumed by itself):

* liveness: a key with a short TTL (``worker_ttl_seconds``) refreshed three
  times per TTL, with the live status hashes. A worker whose key lapsed is dead
  (or paused): its pending entries are taken over within seconds, under a new
  fence, without waiting out the step lease.
* heartbeats: running steps keep their locks and stream entries fresh and, in
  Postgres, their ``updated_at`` (the fallback once Redis is lost); a run whose
  lock or fence moved to another execution is cancelled.
* delayed retries, and the reconciler (one leader per deployment).
* with a meter (``Runtime.metrics``): its groups' lag and pending, read every few
  seconds for the stream gauges.

Only a defect in the worker's own code ends it, with one clear error.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.abc
from redis.exceptions import ResponseError

from orchestrator.connections import OUTAGE, REDIS_DOWN, drop_idle_connections
from orchestrator.coordination import consolidation, delayed, status, streams
from orchestrator.engine import timers
from orchestrator.engine.consolidator import Consolidator
from orchestrator.engine.protocol import StepRunner
from orchestrator.engine.reconciler import Reconciler
from orchestrator.errors import ConfigurationError, OrchestratorError, first_leaf
from orchestrator.runtime import Runtime

log = logging.getLogger("orchestrator.worker")

STREAM_METRICS_SECONDS = 5.0  # how often a worker with a meter reads its groups' backlog


class Worker:
    """Runs the steps of some (default: all) agents of an app; its knobs are its arguments."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        agents: Sequence[str] | None = None,
        concurrency: int = 8,
        consumer: str | None = None,
        reconcile: bool = True,
        consolidate: bool | None = None,
    ) -> None:
        self.rt = runtime
        self.agents = tuple(agents or runtime.app.agents)
        unknown = [a for a in self.agents if a not in runtime.app.agents]
        if unknown:
            raise ConfigurationError(f"unknown agent(s) for this app: {', '.join(unknown)}")
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        self.concurrency = concurrency
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.reconcile = reconcile
        # Consolidation (long-term memory): by default wherever a pipeline asks for it.
        self.consolidate = (
            any(p.consolidate for p in runtime.app.pipelines.values())
            if consolidate is None
            else consolidate
        )
        self._stop = anyio.Event()
        self.runner = StepRunner(runtime, self.consumer)
        self.runner.refresh_liveness = self._report_status
        self._cursor: dict[str, bytes | str] = {}
        self.started_at = time.time()  # reset when run() starts

    def stop(self) -> None:
        """Stop reading; running steps get ``shutdown_grace_seconds`` to finish."""
        self._stop.set()
        self.runner.stopping.set()

    async def run(self) -> None:
        """Run until ``stop()``; a defect ends it with one OrchestratorError, outages never do."""
        try:
            await self._run()
        except BaseExceptionGroup as group:
            first = first_leaf(group)
            if isinstance(first, BaseException) and not isinstance(first, Exception):
                raise first from None  # cancellation, KeyboardInterrupt: not a defect
            raise OrchestratorError(
                f"worker {self.consumer} stopped by a defect: {type(first).__name__}: {first}"
            ) from first

    async def run_until_idle(self, *, timeout: float = 30.0, poll_seconds: float = 0.05) -> None:
        """Run this worker until the deployment is idle, then stop it and return (for tests).

        Idle means all of these at once (checked in this order, so work moving from one
        place to the next is never missed):

        * Postgres: no step is queued in a running workflow (waiting in a stream, being
          run, or retrying) and no waiting step has a timer (a ``ctx.sleep``, a wait's
          timeout), unless its due time is past this call's deadline (``timeout``
          seconds from its start): a timer or retry due before then is waited for, one
          due later counts as parked;
        * this worker runs no step and waits out no outage for one;
        * no stream of this worker's agents has entries undelivered or pending
          (delivered but not acknowledged, by any consumer).

        A workflow parked on a signal with no timeout (``ctx.ask``, ``ctx.wait_for``
        without one) is idle: nothing inside the deployment will move it; so are
        workflows queued behind it in its session. Submit first, then call this; to go
        on after sending a signal or a reply, call it again. Not while ``run()`` runs.

        Raises TimeoutError, naming what is still busy, when not idle within ``timeout``
        seconds (the worker is stopped first: a running step gets the shutdown grace).
        """
        self._stop, self.runner.stopping = anyio.Event(), anyio.Event()  # runnable again
        busy, deadline = ["not checked yet"], anyio.current_time() + timeout
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.run)
                with anyio.move_on_after(timeout):
                    while busy:
                        await anyio.sleep(poll_seconds)
                        busy = await self._busy(deadline - anyio.current_time())
                self.stop()
        except BaseExceptionGroup as group:
            raise first_leaf(group) from None
        if busy:
            raise TimeoutError(
                f"worker {self.consumer} not idle after {timeout:g}s: {'; '.join(busy)}"
            )

    async def _busy(self, within: float) -> list[str]:
        """What keeps the deployment from being idle for ``within`` seconds (see
        ``run_until_idle``)."""
        rt, busy = self.rt, []
        try:
            queued, timers = await rt.store.busy(within=max(within, 0.0))
            if queued:
                busy.append(f"{queued} queued step(s)")
            if timers:
                busy.append(f"{timers} step(s) waiting on a timer due before the deadline")
            if self.runner.running or self.runner.held:
                busy.append("a step running in this worker")
            for agent in self.agents:
                if await streams.undelivered_since(rt.redis, rt.keys, agent) is not None:
                    busy.append(f"undelivered entries on the {agent} stream")
                try:
                    pending = await streams.pending_by_consumer(rt.redis, rt.keys, agent)
                except ResponseError:
                    pending = {}  # no stream or group yet: nothing was delivered
                if pending:
                    busy.append(f"{sum(pending.values())} pending entries on the {agent} stream")
            busy += await self._consolidating()
        except OUTAGE as exc:
            busy.append(f"outage: {exc}")
        return busy

    async def _consolidating(self) -> list[str]:
        """Consolidation entries this worker still has to take or finish."""
        if not self.consolidate:
            return []
        waiting = await consolidation.state(self.rt.redis, self.rt.keys)
        left = waiting.undelivered + waiting.pending
        return [f"{left} workflow(s) to consolidate"] if left else []

    async def _run(self) -> None:
        self.started_at = time.time()
        await self._until_up("starting", self._start)
        settings = self.rt.settings
        async with anyio.create_task_group() as background:
            background.start_soon(
                self._every, "liveness", self._report_status, settings.worker_ttl_seconds / 3
            )
            background.start_soon(
                self._every, "heartbeat", self._heartbeat, settings.lease_seconds / 3
            )
            background.start_soon(self._every, "delayed retries", self._move_delayed, 0.2)
            background.start_soon(
                self._every, "timers", self._wake_timers, settings.timer_interval_seconds
            )
            if self.reconcile:
                background.start_soon(Reconciler(self.rt, self.consumer).run, self._stop)
            metrics = self.rt.metrics
            if self.consolidate:
                # Its lag gauges cost a query every few seconds: only when metrics go somewhere.
                meter = metrics.meter if metrics.enabled else None
                background.start_soon(
                    Consolidator(self.rt, self.consumer, meter=meter).run, self._stop
                )
            if metrics.enabled:
                background.start_soon(
                    self._every, "stream metrics", self._measure_streams, STREAM_METRICS_SECONDS
                )
            async with anyio.create_task_group() as consumers:
                for agent in self.agents:
                    consumers.start_soon(self._consume, agent)
            # Every step has finished (or was abandoned after the grace period).
            background.cancel_scope.cancel()
        # Gone on purpose: whatever is still pending on this consumer is taken over now,
        # not when the liveness key lapses; `orchestrator agents` stops listing it.
        with anyio.move_on_after(1):
            try:
                await status.gone(self.rt.redis, self.rt.keys, self.consumer)
            except REDIS_DOWN:
                pass

    async def _start(self) -> None:
        await self._report_status()  # alive before taking any lock
        for agent in self.agents:
            await streams.ensure_group(self.rt.redis, self.rt.keys, agent)
        if self.consolidate:
            await consolidation.ensure_group(self.rt.redis, self.rt.keys)

    async def _until_up(self, what: str, once: Callable[[], Awaitable[None]]) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                await once()
                return
            except OUTAGE as exc:
                log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
            with anyio.move_on_after(delay):
                await self._stop.wait()
            delay = min(delay * 2, 5.0)

    async def _every(self, what: str, once: Callable[[], Awaitable[None]], interval: float) -> None:
        """Run ``once`` every ``interval`` seconds; an outage is logged once and waited out."""
        failing = False
        while True:
            try:
                await once()
                if failing:
                    log.warning("%s: back to normal", what)
                failing = False
            except OUTAGE as exc:
                await drop_idle_connections(self.rt.redis, exc)
                if not failing:
                    log.warning("%s: %s; retrying until it is back", what, exc)
                failing = True
            await anyio.sleep(interval)

    async def _measure_streams(self) -> None:
        """Lag and pending of this worker's groups, for the stream gauges."""
        rt = self.rt
        rt.metrics.observe_streams(await streams.backlog(rt.redis, rt.keys, self.agents))

    async def _move_delayed(self) -> None:
        if not self._stop.is_set():
            await delayed.move_due(self.rt.redis, self.rt.keys)

    async def _wake_timers(self) -> None:
        if not self._stop.is_set():
            await timers.wake_due(self.rt)

    async def _consume(self, agent: str) -> None:
        slots = anyio.Semaphore(self.concurrency)
        async with anyio.create_task_group() as outer:
            handlers_scope = anyio.CancelScope()
            outer.start_soon(self._cancel_after_grace, handlers_scope)
            with handlers_scope:
                async with anyio.create_task_group() as handlers:
                    await self._read_loop(agent, slots, handlers)
            outer.cancel_scope.cancel()

    async def _cancel_after_grace(self, scope: anyio.CancelScope) -> None:
        await self._stop.wait()
        await anyio.sleep(self.rt.settings.shutdown_grace_seconds)
        scope.cancel()  # steps still running are abandoned: their entries stay pending

    async def _read_loop(
        self, agent: str, slots: anyio.Semaphore, handlers: anyio.abc.TaskGroup
    ) -> None:
        failing, delay = False, 0.1
        due = {"dead": anyio.current_time(), "idle": anyio.current_time()}
        while not self._stop.is_set():
            await slots.acquire()
            try:
                entries, takeover = await self._next(agent, 1 + slots.value, due)
            except OUTAGE as exc:
                slots.release()
                await drop_idle_connections(self.rt.redis, exc)
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    # Redis lost the stream (restart, FLUSHALL): recreate it and go on.
                    await self._until_up(f"recreating the {agent} stream", self._start)
                    continue
                if not failing:
                    log.warning("reading the %s stream: %s; retrying until it is back", agent, exc)
                failing = True
                with anyio.move_on_after(delay):
                    await self._stop.wait()
                delay = min(delay * 2, 5.0)
                continue
            if failing:
                log.warning("reading the %s stream: back to normal", agent)
            failing, delay = False, 0.1
            if not entries:
                slots.release()
                continue
            for _ in entries[1:]:
                await slots.acquire()
            for entry in entries:
                handlers.start_soon(self._guarded, agent, entry, slots, takeover)

    async def _next(
        self, agent: str, count: int, due: dict[str, float]
    ) -> tuple[list[streams.Entry], bool]:
        """Entries to run, and whether they are takeovers: first those of dead workers,
        then (rarely) any idle past the lease, else new ones."""
        rt, now = self.rt, anyio.current_time()
        if now >= due["dead"]:
            due["dead"] = now + rt.settings.worker_ttl_seconds / 3
            taken = await self._take_from_dead(agent, count)
            if taken:
                return taken, True
        if now >= due["idle"]:
            due["idle"] = now + rt.settings.lease_seconds / 2
            cursor, taken = await streams.reclaim(
                rt.redis,
                rt.keys,
                agent,
                self.consumer,
                min_idle_ms=int(rt.settings.lease_seconds * 1000),
                count=count,
                start=self._cursor.get(agent, "-"),
            )
            self._cursor[agent] = cursor
            if taken:
                return taken, True
        read = await streams.read(
            rt.redis, rt.keys, agent, self.consumer, count=count, block_ms=rt.settings.block_ms
        )
        return read, False

    async def _take_from_dead(self, agent: str, count: int) -> list[streams.Entry]:
        """Claim entries pending on consumers whose liveness key lapsed."""
        rt = self.rt
        owners = [
            o
            for o in await streams.pending_by_consumer(rt.redis, rt.keys, agent)
            if o != self.consumer
        ]
        if not owners:
            return []
        alive = await status.alive(rt.redis, rt.keys, owners)
        ids: dict[bytes, int] = {}  # entry id -> idle ms (since the owner last touched it)
        for owner, is_alive in zip(owners, alive, strict=True):
            if not is_alive and len(ids) < count:
                ids |= await streams.pending_of(
                    rt.redis, rt.keys, agent, owner, count=count - len(ids)
                )
        if ids:
            log.warning("taking over %d %s step(s) of dead worker(s)", len(ids), agent)
        # Half the TTL of idle time: one claimer wins each entry, the others see it fresh.
        min_idle = int(rt.settings.worker_ttl_seconds * 500)
        return await streams.claim(
            rt.redis, rt.keys, agent, self.consumer, ids, min_idle_ms=min_idle
        )

    async def _guarded(
        self, agent: str, entry: streams.Entry, slots: anyio.Semaphore, takeover: bool
    ) -> None:
        try:
            await self.process(agent, entry, takeover=takeover)
        except Exception:
            # A defect handling one entry: it stays pending and is taken over later.
            log.exception("unexpected error handling %s entry %r", agent, entry.id)
        finally:
            slots.release()

    async def process(self, agent: str, entry: streams.Entry, *, takeover: bool = False) -> None:
        """Run one stream entry through the step protocol."""
        await self.runner.process(agent, entry, takeover=takeover)

    async def _report_status(self) -> None:
        """Refresh this worker's liveness key, its status hash and its live status hash per
        agent, in one round trip."""
        rt = self.rt
        running = sorted(self.runner.running.values(), key=lambda r: r.since)
        pipe = rt.redis.pipeline(transaction=False)
        status.mark_alive_in(pipe, rt.keys, self.consumer, rt.settings.worker_ttl_seconds)
        now, clock = time.time(), anyio.current_time()
        # ``since`` is on the monotonic clock: as wall time for other processes.
        steps = [status.InFlight.of(r.envelope, now - (clock - r.since)) for r in running]
        status.mark_worker_in(
            pipe, rt.keys, self._status(now, steps), rt.settings.status_ttl_seconds
        )
        for agent in self.agents:
            mine = [r.envelope for r in running if r.envelope.agent == agent]
            status.mark_in(
                pipe,
                rt.keys.agent_status(agent, self.consumer),
                status.fields(mine, self.runner.last.get(agent)),
                rt.settings.status_ttl_seconds,
            )
        await pipe.execute()

    def _status(self, now: float, steps: Sequence[status.InFlight]) -> status.WorkerStatus:
        return status.WorkerStatus(
            name=self.consumer,
            host=socket.gethostname(),
            pid=os.getpid(),
            app=f"{self.rt.app.name} {self.rt.app.version}",
            agents=self.agents,
            concurrency=self.concurrency,
            started_at=self.started_at,
            updated_at=now,
            in_flight=tuple(steps),
        )

    async def _heartbeat(self) -> None:
        """Keep running steps (and those waiting out an outage) alive, in one Redis round trip
        and (for long ones) one statement.

        Each lock is extended (or taken again if Redis lost it) and each stream entry's
        idle time reset; a lock held by another execution means this run was taken
        over. Steps running for a third of the lease also refresh ``updated_at`` in
        Postgres, which answers whether their attempt is still current.
        """
        rt = self.rt
        running = list(self.runner.running.values())
        held = list(self.runner.held.values())
        if not running and not held:
            return
        pipe = rt.redis.pipeline(transaction=False)
        for r in running:
            r.lock.keep_in(pipe)
            streams.touch_in(pipe, rt.keys, r.envelope.agent, self.consumer, r.entry.id)
        for h in held:
            h.lock.keep_in(pipe)
            streams.touch_in(pipe, rt.keys, h.agent, self.consumer, h.entry_id)
        replies = await pipe.execute(raise_on_error=False)
        for r, kept in zip(running, replies[: 2 * len(running) : 2], strict=True):
            if kept == 0:
                self.runner.supersede(r)
        now, every = anyio.current_time(), rt.settings.lease_seconds / 3
        long = [r for r in running if now - r.since >= every and not r.committing]
        if not long:
            return
        current = await rt.store.heartbeat([(r.envelope.step_id, r.envelope.attempt) for r in long])
        for r in long:
            if r.envelope.step_id not in current:
                self.runner.supersede(r)
