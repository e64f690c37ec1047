"""The worker: reads envelopes from agent streams and runs the step protocol.

Per step: one Redis round trip to take the step's lease (a lock), one
Postgres read to check the step is open, the agent run, ONE Postgres
transaction that completes the step fenced on its attempt, and one Redis
round trip for the handoff (XADD next, XACK, status, PUBLISH, unlock).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import anyio
import asyncpg
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator import status, streams
from orchestrator.context import StepContext, StepInfo, bind
from orchestrator.errors import (
    AgentError,
    ConfigurationError,
    FenceRejected,
    InvalidInput,
    ServiceUnavailable,
    StepError,
)
from orchestrator.locks import Lock
from orchestrator.runtime import Runtime
from orchestrator.store import steps
from schemas import Signal, TaskEnvelope, WorkflowStatus

log = logging.getLogger("orchestrator.worker")

# Errors of the infrastructure, not of the step: the entry stays pending and is
# retried or reclaimed later, without burning one of the step's attempts.
INFRA_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    RedisConnectionError,
    RedisTimeoutError,
    ServiceUnavailable,
    ConnectionError,
)


class Worker:
    def __init__(
        self,
        runtime: Runtime,
        *,
        agents: Sequence[str] | None = None,
        concurrency: int = 8,
        consumer: str | None = None,
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
        self._stop = anyio.Event()
        self.processed = 0

    def stop(self) -> None:
        """Stop reading; steps already running finish first."""
        self._stop.set()

    async def run(self) -> None:
        for agent in self.agents:
            await streams.ensure_group(self.rt.redis, self.rt.keys, agent)
        async with anyio.create_task_group() as tg:
            for agent in self.agents:
                tg.start_soon(self._consume, agent)

    async def _consume(self, agent: str) -> None:
        slots = anyio.Semaphore(self.concurrency)
        backoff = 0.1
        async with anyio.create_task_group() as handlers:
            while not self._stop.is_set():
                await slots.acquire()
                try:
                    entries = await streams.read(
                        self.rt.redis,
                        self.rt.keys,
                        agent,
                        self.consumer,
                        count=1 + slots.value,
                        block_ms=self.rt.settings.block_ms,
                    )
                except (RedisError, OSError) as exc:
                    slots.release()
                    log.warning(
                        "reading %s stream failed (%s); retrying in %.1fs", agent, exc, backoff
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                backoff = 0.1
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
            # Left pending in the stream: redelivered by reclaim once the service is back.
            log.warning("step on %s left pending: %s", agent, exc)
        except Exception:
            log.exception("unexpected error handling %s entry %r", agent, entry.id)
        finally:
            slots.release()

    async def process(self, agent: str, entry: streams.Entry) -> None:
        """Run one stream entry through the step protocol."""
        rt = self.rt
        try:
            envelope = streams.decode(entry)
            if envelope.agent != agent:
                raise InvalidInput(f"envelope for agent {envelope.agent!r} on {agent!r} stream")
        except InvalidInput as exc:
            log.warning("dead-lettering entry %r of %s: %s", entry.id, agent, exc)
            await streams.dead_letter(rt.redis, rt.keys, agent, entry, str(exc))
            return
        lock = Lock(
            rt.redis,
            rt.keys.step_lock(envelope.workflow_id, envelope.seq),
            int(rt.settings.lease_seconds * 1000),
        )
        if not await self._take_lease(envelope, lock):
            # Another worker holds this step's lease: this delivery is a duplicate.
            await self._hand_off(envelope, entry, [], None, None)
            return
        async with rt.pool.acquire() as conn:
            opened = await steps.open_step(conn, envelope)
        if not opened.runnable:
            log.info("skipping %s step %s: %s", agent, envelope.step_id, opened.reason)
            await self._hand_off(envelope, entry, [], None, lock)
            return
        await self._run_step(envelope, entry, lock, opened)

    async def _take_lease(self, envelope: TaskEnvelope, lock: Lock) -> bool:
        """Take the step's lock and show the agent as running, in one round trip."""
        pipe = self.rt.redis.pipeline(transaction=False)
        lock.acquire_in(pipe)
        status.mark_in(
            pipe,
            self.rt.keys.agent_status(envelope.agent, self.consumer),
            status.running(envelope),
            self.rt.settings.status_ttl_seconds,
        )
        won, *_ = await pipe.execute()
        return bool(won)

    async def _run_step(
        self, envelope: TaskEnvelope, entry: streams.Entry, lock: Lock, opened: steps.OpenStep
    ) -> None:
        rt = self.rt
        cls = rt.app.agents[envelope.agent]
        info = StepInfo(
            envelope.workflow_id,
            envelope.step_id,
            envelope.seq,
            envelope.agent,
            envelope.attempt,
            envelope.tenant_id,
            envelope.assigned_by,
            envelope.pipeline,
        )
        ctx = StepContext(rt, info, envelope.payload, opened.recorded, cls.tools)
        started = datetime.now(UTC)
        try:
            outcome = await self._execute(cls, ctx, envelope, started)
            async with rt.pool.acquire() as conn:
                nxt = await steps.complete(conn, envelope, outcome)
        except FenceRejected as exc:
            log.info("%s", exc)
            await self._hand_off(envelope, entry, [], None, lock)
            return
        except INFRA_ERRORS:
            await lock.release()
            raise
        except Exception as exc:
            await self._fail(envelope, entry, lock, ctx, started, exc)
            return
        self.processed += 1
        done = WorkflowStatus.RUNNING if nxt else WorkflowStatus.COMPLETED
        await self._hand_off(
            envelope,
            entry,
            nxt,
            Signal(workflow_id=envelope.workflow_id, status=done, seq=envelope.seq),
            lock,
        )

    async def _execute(
        self, cls: Any, ctx: StepContext, envelope: TaskEnvelope, started: datetime
    ) -> steps.Outcome:
        agent = cls()
        try:
            data = cls.input_model.model_validate(envelope.payload)
        except ValidationError as exc:
            raise AgentError(
                f"input does not fit {cls.input_model.__name__}: {exc}", non_retryable=True
            ) from exc
        token = bind(ctx)
        try:
            with anyio.fail_after(cls.timeout_seconds):
                output = await agent.run(ctx, data)
        except TimeoutError as exc:
            raise AgentError(f"timed out after {cls.timeout_seconds}s") from exc
        finally:
            token.var.reset(token)
        if not isinstance(output, cls.output_model):
            raise AgentError(
                f"run() returned {type(output).__name__}, expected {cls.output_model.__name__}",
                non_retryable=True,
            )
        return steps.Outcome(
            output=output.model_dump(mode="json"),
            state={**envelope.payload, **agent.state_update(output)},
            next_agents=self._route(agent, envelope, output),
            tool_runs=ctx.tool_runs,
            messages=ctx.messages,
            worker=self.consumer,
            started_at=started,
        )

    def _route(self, agent: Any, envelope: TaskEnvelope, output: BaseModel) -> tuple[str, ...]:
        chosen = agent.route(output)
        if chosen is None:
            return self.rt.app.default_next(envelope.pipeline, envelope.agent)
        unknown = [a for a in chosen if a not in self.rt.app.agents]
        if unknown:
            raise AgentError(
                f"routes to unknown agent(s): {', '.join(unknown)}", non_retryable=True
            )
        return tuple(chosen)

    async def _fail(
        self,
        envelope: TaskEnvelope,
        entry: streams.Entry,
        lock: Lock,
        ctx: StepContext,
        started: datetime,
        exc: Exception,
    ) -> None:
        rt = self.rt
        cls = rt.app.agents[envelope.agent]
        max_attempts = cls.max_attempts or rt.settings.max_attempts
        non_retryable = isinstance(exc, StepError) and exc.non_retryable
        retry = not non_retryable and envelope.attempt < max_attempts
        error = f"{type(exc).__name__}: {exc}"[:2000]
        log.warning(
            "%s step %s attempt %d failed (%s): %s",
            envelope.agent,
            envelope.step_id,
            envelope.attempt,
            "retrying" if retry else "giving up",
            error,
        )
        try:
            async with rt.pool.acquire() as conn:
                again = await steps.fail(
                    conn,
                    envelope,
                    error=error,
                    retry=retry,
                    recorded=ctx.tool_runs,
                    worker=self.consumer,
                    started_at=started,
                )
        except FenceRejected as fence:
            log.info("%s", fence)
            await self._hand_off(envelope, entry, [], None, lock)
            return
        signal = (
            None
            if again
            else Signal(
                workflow_id=envelope.workflow_id, status=WorkflowStatus.FAILED, seq=envelope.seq
            )
        )
        await self._hand_off(envelope, entry, [again] if again else [], signal, lock)

    async def _hand_off(
        self,
        envelope: TaskEnvelope,
        entry: streams.Entry,
        nxt: Sequence[TaskEnvelope],
        signal: Signal | None,
        lock: Lock | None,
    ) -> None:
        rt = self.rt
        await streams.hand_off(
            rt.redis,
            rt.keys,
            streams.Handoff(
                done=envelope,
                entry_id=entry.id,
                next=nxt,
                signal=signal,
                lock=lock,
                status_key=rt.keys.agent_status(envelope.agent, self.consumer),
                status=status.idle(envelope),
                status_ttl=rt.settings.status_ttl_seconds,
            ),
        )
