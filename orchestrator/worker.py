"""The worker: feeds stream entries to the step protocol (``orchestrator.protocol``).

Per agent, one reader fills up to ``concurrency`` slots with XREADGROUP and,
every half lease, takes over entries idle past the lease (XAUTOCLAIM). Beside
the readers: moving due retries, heartbeating long steps, and the reconciler
(one leader per deployment).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Sequence

import anyio
from redis.exceptions import RedisError, ResponseError

from orchestrator import delayed, status, streams
from orchestrator.errors import (
    ConfigurationError,
)
from orchestrator.protocol import INFRA_ERRORS, StepRunner
from orchestrator.reconciler import Reconciler
from orchestrator.runtime import Runtime

log = logging.getLogger("orchestrator.worker")


class Worker:
    def __init__(
        self,
        runtime: Runtime,
        *,
        agents: Sequence[str] | None = None,
        concurrency: int = 8,
        consumer: str | None = None,
        reconcile: bool = True,
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
        self._stop = anyio.Event()
        self.runner = StepRunner(runtime, self.consumer)

    def stop(self) -> None:
        """Stop reading; running steps get ``shutdown_grace_seconds`` to finish."""
        self._stop.set()

    async def run(self) -> None:
        for agent in self.agents:
            await self._ensure_group(agent)
        async with anyio.create_task_group() as background:
            background.start_soon(self._move_delayed)
            background.start_soon(self._heartbeats)
            background.start_soon(self._report_status)
            if self.reconcile:
                background.start_soon(Reconciler(self.rt).run, self._stop)
            async with anyio.create_task_group() as consumers:
                for agent in self.agents:
                    consumers.start_soon(self._consume, agent)
            # Every step has finished (or was abandoned after the grace period).
            background.cancel_scope.cancel()

    async def _ensure_group(self, agent: str) -> None:
        backoff_s = 0.1
        while not self._stop.is_set():
            try:
                await streams.ensure_group(self.rt.redis, self.rt.keys, agent)
                return
            except (RedisError, OSError) as exc:
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, backoff_s)
                await anyio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)

    async def _move_delayed(self) -> None:
        while not self._stop.is_set():
            try:
                await delayed.move_due(self.rt.redis, self.rt.keys)
            except (RedisError, OSError) as exc:
                log.debug("moving delayed retries failed: %s", exc)
            with anyio.move_on_after(0.2):
                await self._stop.wait()

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
        rt = self.rt
        lease_ms = int(rt.settings.lease_seconds * 1000)
        backoff_s = 0.1
        next_reclaim = anyio.current_time()
        while not self._stop.is_set():
            await slots.acquire()
            try:
                if anyio.current_time() >= next_reclaim:
                    next_reclaim = anyio.current_time() + rt.settings.lease_seconds / 2
                    entries = await streams.reclaim(
                        rt.redis,
                        rt.keys,
                        agent,
                        self.consumer,
                        min_idle_ms=lease_ms,
                        count=1 + slots.value,
                    )
                else:
                    entries = await streams.read(
                        rt.redis,
                        rt.keys,
                        agent,
                        self.consumer,
                        count=1 + slots.value,
                        block_ms=rt.settings.block_ms,
                    )
            except (RedisError, OSError) as exc:
                slots.release()
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                    # Redis lost the stream (restart, FLUSHALL): recreate it and go on.
                    await self._ensure_group(agent)
                    continue
                log.warning(
                    "reading %s stream failed (%s); retrying in %.1fs", agent, exc, backoff_s
                )
                await anyio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
                continue
            backoff_s = 0.1
            if not entries:
                slots.release()
                continue
            for _ in entries[1:]:
                await slots.acquire()
            for entry in entries:
                handlers.start_soon(self._guarded, agent, entry, slots)

    async def _guarded(self, agent: str, entry: streams.Entry, slots: anyio.Semaphore) -> None:
        try:
            await self.process(agent, entry)
        except INFRA_ERRORS as exc:
            # Left pending in the stream: reclaimed once the service is back.
            log.warning("step on %s left pending: %s", agent, exc)
        except Exception:
            log.exception("unexpected error handling %s entry %r", agent, entry.id)
        finally:
            slots.release()

    async def process(self, agent: str, entry: streams.Entry) -> None:
        """Run one stream entry through the step protocol."""
        await self.runner.process(agent, entry)

    async def _report_status(self) -> None:
        """Refresh this consumer's live status hash per agent, about once a second."""
        rt = self.rt
        while True:
            running = sorted(self.runner.running.values(), key=lambda r: r.since)
            pipe = rt.redis.pipeline(transaction=False)
            for agent in self.agents:
                mine = [r.envelope for r in running if r.envelope.agent == agent]
                status.mark_in(
                    pipe,
                    rt.keys.agent_status(agent, self.consumer),
                    status.fields(mine, self.runner.last.get(agent)),
                    rt.settings.status_ttl_seconds,
                )
            try:
                await pipe.execute()
            except (RedisError, OSError) as exc:
                log.debug("status refresh failed: %s", exc)
            await anyio.sleep(min(1.0, rt.settings.status_ttl_seconds / 3))

    async def _heartbeats(self) -> None:
        """Keep long steps alive: one loop for the whole worker, so short steps never pay.

        A step running for more than a third of the lease gets its lock extended,
        its stream entry's idle time reset, and its Postgres lease refreshed.
        """
        rt = self.rt
        every = rt.settings.lease_seconds / 3
        while True:
            await anyio.sleep(every)
            now = anyio.current_time()
            for running in [r for r in self.runner.running.values() if now - r.since >= every]:
                await self.runner.beat(running)
