"""The reconciler: one leader re-derives lost work from Postgres.

Leadership is a Redis lock with a random token (compare-and-delete release,
compare-and-extend renewal). Each renewal must answer within a third of the
lock's TTL and a term is capped, so a slow or partitioned leader steps down on
its own; the moment a renewal fails it stops working. Two leaders for a moment
would only enqueue duplicates, which the attempt fence makes harmless.

A step is re-enqueued only when Redis says nobody has it: no lease (lock) on
it, not possibly waiting in its stream's backlog, and no entry of it pending
(delivered, unacknowledged: a worker runs it, or takes it over from a dead or
silent holder, so a requeue would only recover it twice). Postgres timestamps
(``stall_seconds`` without progress) are the fallback for when Redis lost
everything. The leader takes the step's lock while it re-enqueues, so it
never moves the fence under a run that just started. Any outage is waited
out; it never ends the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from orchestrator.connections import (
    OUTAGE,
    REDIS_DOWN,
    drop_idle_connections,
    redis_errors,
)
from orchestrator.coordination import status, streams
from orchestrator.coordination.locks import Lock
from orchestrator.engine import consolidator, schedules
from orchestrator.runtime import Runtime
from orchestrator.store import recovery

log = logging.getLogger("orchestrator.reconciler")

TERM_PASSES = 60  # passes per leadership term before standing for election again
# The backlog check compares a Postgres time (the step's commit started) with a Redis
# one (the last delivered entry's id): this covers the commit-to-XADD gap and clock skew.
BACKLOG_MARGIN_MS = 5_000
HOUSEKEEPING_EVERY = 10  # passes between trimming streams, dropping dead consumers, pruning


@dataclass(frozen=True, slots=True)
class PassReport:
    """What one reconciler pass did: how many steps it re-enqueued."""

    requeued: int


class Reconciler:
    """Re-derives lost work from Postgres; one leader at a time (see the module docstring)."""

    def __init__(self, runtime: Runtime, consumer: str = "reconciler") -> None:
        self.rt = runtime
        self.consumer = consumer
        self.interval = runtime.settings.reconcile_interval_seconds
        self.passes = 0
        self._failing = False

    async def run(self, stop: anyio.Event) -> None:
        """Stand for leadership and reconcile every interval until ``stop``; outages are waited
        out."""
        while not stop.is_set():
            # The token names this worker: `orchestrator agents` shows who leads.
            lock = Lock(
                self.rt.redis,
                self.rt.keys.reconciler_lock(),
                int(self.interval * 3 * 1000),
                owner=self.consumer,
            )
            try:
                if await lock.acquire():
                    await self._lead(lock, stop)
            except OUTAGE as exc:
                await self._outage(exc)
            with anyio.move_on_after(self.interval):
                await stop.wait()

    async def _outage(self, exc: BaseException) -> None:
        await drop_idle_connections(self.rt.redis, exc)
        if not self._failing:
            log.warning("reconciler: %s; retrying until it is back", exc)
        self._failing = True

    async def _lead(self, lock: Lock, stop: anyio.Event) -> None:
        log.info("reconciler: leading")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep, lock, tg.cancel_scope)
                for _ in range(TERM_PASSES):
                    if stop.is_set():
                        break
                    try:
                        await self.pass_once()
                        if self._failing:
                            log.warning("reconciler: back to normal")
                        self._failing = False
                    except OUTAGE as exc:
                        await self._outage(exc)
                    with anyio.move_on_after(self.interval):
                        await stop.wait()
                tg.cancel_scope.cancel()
        finally:
            await lock.release_quietly(2)

    async def _keep(self, lock: Lock, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.interval)
            renewed = False
            with anyio.move_on_after(self.interval):
                try:
                    renewed = await lock.extend()
                except REDIS_DOWN:
                    renewed = False
            if not renewed:
                log.warning("reconciler: lost leadership; stopping at once")
                scope.cancel()
                return

    async def _start_stalled_sessions(self) -> int:
        """Sessions whose active workflow ended without starting the next (a lost promotion)."""
        rt, started = self.rt, 0
        for promoted in await rt.store.promote_stalled_sessions():
            with redis_errors():
                await streams.enqueue(rt.redis, rt.keys, promoted)
            started += 1
        return started

    async def pass_once(self) -> PassReport:
        """Recreate streams and groups, then re-enqueue every open step nobody has."""
        rt = self.rt
        with redis_errors():
            for agent in rt.app.agents:
                await streams.ensure_group(rt.redis, rt.keys, agent)
        stalled = await rt.store.stalled(older_than=rt.settings.stall_after)
        with redis_errors():
            agents = {s.agent for s in stalled}
            backlog = {a: await streams.undelivered_since(rt.redis, rt.keys, a) for a in agents}
            pending = {a: await streams.pending_steps(rt.redis, rt.keys, a) for a in agents}
        requeued = await self._start_stalled_sessions()
        await schedules.tick(rt)  # due cron ticks; idempotent, so two leaders are harmless
        # Completed workflows whose consolidation entry was lost (Redis, a crash before
        # the handoff): back on the queue; a duplicate is skipped (consolidated_at).
        await consolidator.requeue_unconsolidated(rt)
        for step in stalled:
            if step.step_id in pending[step.agent]:
                continue  # delivered: its holder's or a takeover's, not the reconciler's
            since = backlog.get(step.agent)
            if since is not None and step.updated_ms > since - BACKLOG_MARGIN_MS:
                # Enqueued after (or about when) the last delivered entry was: its envelope
                # is most likely still waiting in the backlog. Re-enqueuing it would fence
                # out its own delivery and send it to the back of the line again.
                continue
            requeued += await self._requeue(step)
        self.passes += 1
        if self.passes % HOUSEKEEPING_EVERY == 1:
            await self.housekeeping()
        if requeued:
            log.warning("reconciler: re-enqueued %d step(s) nobody had", requeued)
        return PassReport(requeued)

    async def _requeue(self, step: recovery.Stalled) -> int:
        """Re-enqueue one step under a new fence, holding its lock so no run starts meanwhile;
        0 when its lock is held (it is running) or it moved on since it was read."""
        rt = self.rt
        lock = Lock(
            rt.redis,
            rt.keys.step_lock(step.workflow_id, step.seq),
            int(rt.settings.lease_seconds * 1000),
            owner=self.consumer,
        )
        with redis_errors():
            if not await lock.acquire():
                return 0  # leased: a live worker runs it
        try:
            envelope = await rt.store.requeue(
                step.step_id, reason="stalled", seen_attempt=step.attempt
            )
        finally:
            # Released before the XADD: a worker reading the new envelope at once must
            # find the step free. A takeover in between only makes the envelope stale.
            await lock.release_quietly()
        if envelope is None:
            return 0
        with redis_errors():
            await streams.enqueue(rt.redis, rt.keys, envelope)
        rt.metrics.requeues.add(1, {"agent": step.agent})
        rt.metrics.took_over(step.agent, "requeue", step.idle_seconds)
        log.info(
            "workflow %s step %s (%s): re-enqueued as attempt %d: no progress for %.1fs "
            "and nobody holds it (its worker died, or Redis lost its envelope)",
            step.workflow_id,
            step.seq,
            step.agent,
            envelope.attempt,
            step.idle_seconds,
            extra={
                "workflow_id": str(step.workflow_id),
                "step_id": str(step.step_id),
                "seq": step.seq,
                "agent": step.agent,
                "attempt": envelope.attempt,
            },
        )
        return 1

    async def housekeeping(self) -> None:
        """Keep Redis and Postgres bounded: trim acknowledged stream entries, drop consumers
        of dead workers and their entries in the ``workers`` set, prune finished workflows'
        history when configured, and memories that decayed or expired."""
        rt = self.rt

        async def is_alive(consumer: str) -> bool:
            return (await status.alive(rt.redis, rt.keys, [consumer]))[0]

        with redis_errors():
            for agent in rt.app.agents:
                await streams.trim_acknowledged(rt.redis, rt.keys, agent)
                await streams.delete_consumers(rt.redis, rt.keys, agent, is_alive)
            await status.drop_gone_workers(rt.redis, rt.keys)
        settings = rt.settings
        if settings.prune_after_days is not None:
            await rt.store.prune(older_than_seconds=settings.prune_after_days * 86400)
        await rt.store.prune_memories(
            half_life_days=settings.memory_half_life_days,
            prune_below=settings.memory_prune_below,
            retention_days=settings.memory_retention_days,
        )
