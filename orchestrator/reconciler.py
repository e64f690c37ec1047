"""The reconciler: one leader re-derives lost work from Postgres.

Leadership is a Redis lock with a random token (compare-and-delete release,
compare-and-extend renewal). Each renewal must answer within a third of the
lock's TTL and a term is capped, so a slow or partitioned leader steps down on
its own; the moment a renewal fails it stops working. Two leaders for a moment
would only enqueue duplicates, which the attempt fence makes harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
from redis.exceptions import RedisError

from orchestrator import streams
from orchestrator.locks import Lock
from orchestrator.runtime import Runtime
from orchestrator.store import recovery

log = logging.getLogger("orchestrator.reconciler")

TERM_PASSES = 60  # passes per leadership term before standing for election again


@dataclass(frozen=True, slots=True)
class PassReport:
    requeued: int


class Reconciler:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self.interval = runtime.settings.reconcile_interval_seconds
        self.passes = 0

    async def run(self, stop: anyio.Event) -> None:
        while not stop.is_set():
            lock = Lock(
                self.rt.redis, self.rt.keys.reconciler_lock(), int(self.interval * 3 * 1000)
            )
            try:
                if await lock.acquire():
                    await self._lead(lock, stop)
            except (RedisError, OSError) as exc:
                log.warning("reconciler: Redis unavailable (%s)", exc)
            with anyio.move_on_after(self.interval):
                await stop.wait()

    async def _lead(self, lock: Lock, stop: anyio.Event) -> None:
        log.info("reconciler: leading")
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep, lock, tg.cancel_scope)
                for _ in range(TERM_PASSES):
                    if stop.is_set():
                        break
                    await self.pass_once()
                    with anyio.move_on_after(self.interval):
                        await stop.wait()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await lock.release()
                except (RedisError, OSError):
                    pass  # it expires by itself

    async def _keep(self, lock: Lock, scope: anyio.CancelScope) -> None:
        while True:
            await anyio.sleep(self.interval)
            renewed = False
            with anyio.move_on_after(self.interval):
                try:
                    renewed = await lock.extend()
                except (RedisError, OSError):
                    renewed = False
            if not renewed:
                log.warning("reconciler: lost leadership; stopping at once")
                scope.cancel()
                return

    async def _start_stalled_sessions(self) -> int:
        """Sessions whose active workflow ended without starting the next (a lost promotion)."""
        rt, started = self.rt, 0
        async with rt.pool.acquire() as conn:
            for session_id in await recovery.stalled_sessions(conn):
                for promoted in await recovery.promote_next(conn, session_id):
                    await streams.enqueue(rt.redis, rt.keys, promoted)
                    started += 1
        return started

    async def pass_once(self) -> PassReport:
        """Recreate streams and groups, then re-enqueue every stalled open step."""
        rt = self.rt
        for agent in rt.app.agents:
            await streams.ensure_group(rt.redis, rt.keys, agent)
        async with rt.pool.acquire() as conn:
            stalled = await recovery.stalled(conn, older_than=rt.settings.stall_after)
        backlog = {
            agent: await streams.undelivered_since(rt.redis, rt.keys, agent)
            for agent in {s.agent for s in stalled}
        }
        requeued = await self._start_stalled_sessions()
        for step in stalled:
            since = backlog.get(step.agent)
            if since is not None and step.updated_ms > since:
                # Enqueued after the last delivered entry: its envelope is most likely
                # still waiting in a backlog. Re-enqueuing it would only add duplicates.
                continue
            async with rt.pool.acquire() as conn:
                envelope = await recovery.requeue(conn, step.step_id, reason="stalled")
            if envelope is None:
                continue
            await streams.enqueue(rt.redis, rt.keys, envelope)
            requeued += 1
        self.passes += 1
        if requeued:
            log.info("reconciler: re-enqueued %d stalled step(s)", requeued)
        return PassReport(requeued)
