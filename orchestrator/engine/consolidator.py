"""The consolidator: distils completed workflows into long-term memory, off the hot path.

A completed workflow of a consolidating pipeline reaches the consolidation stream in
its last step's handoff; consolidators (consumer group ``consolidation``) take
entries with XREADGROUP, and entries idle past the lease (a dead or hung
consolidator) with XAUTOCLAIM. One consolidation is ONE Postgres transaction,
scoped to the workflow's tenant (taken from its row): lock the workflow, skip it if
consolidated already, read its transcript, distil, pass each memory through the
gate, mark it consolidated, commit; only then is the entry acknowledged. A crash
anywhere leaves the entry pending (taken over later) or the workflow unmarked
(re-added by ``requeue_unconsolidated``); a redelivery finds it marked. So a memory
is written once, whatever fails.

An entry that cannot be read is dead-lettered; a consolidation that fails (not an
outage) is dead-lettered too, and retried by ``requeue_unconsolidated`` until it
has failed ``MAX_FAILURES`` times: the last dead letter gives it up (the workflow stops
consolidating; its dead letters are the record). Redis and Postgres outages are waited
out.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any
from uuid import UUID

import anyio
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from redis.exceptions import ResponseError

from orchestrator.connections import OUTAGE, redis_errors
from orchestrator.coordination import consolidation as queue
from orchestrator.coordination import recall_cache
from orchestrator.coordination.streams import Entry
from orchestrator.errors import AgentError, InvalidInput
from orchestrator.models.distill import Distilled, Distiller, Finished, distiller_for
from orchestrator.runtime import Runtime
from orchestrator.store import consolidation as marks
from orchestrator.store import dead_letters, memory_gate, tenancy
from orchestrator.store.memory_gate import Candidate, GateCounts, Source

log = logging.getLogger("orchestrator.consolidator")

SUMMARY_KIND = "summary"
# Completed this long ago and still unconsolidated, with nothing in the stream that
# could hold it: lost (covers the commit-to-XADD gap and Redis/Postgres clock skew).
REQUEUE_AFTER_SECONDS = 5.0
REQUEUE_BATCH = 1_000
MAX_FAILURES = 3  # dead letters of one workflow before requeueing gives up on it
LAG_EVERY_SECONDS = 5.0  # how often a consolidator with a meter measures the lag


@dataclass(frozen=True, slots=True)
class Consolidated:
    """What one consolidation did: whose memories and the gate's counts; ``counts`` is
    None when there was nothing to do (consolidated already, or not to consolidate)."""

    workflow_id: UUID
    tenant_id: str
    customer_id: str
    counts: GateCounts | None


@dataclass(frozen=True, slots=True)
class ConsolidationLag:
    """How far consolidation is behind: stream entries not yet delivered and delivered
    but not acknowledged (Redis), and the age in seconds of the oldest completed,
    unconsolidated workflow (Postgres: the durable lag; None when there is none)."""

    undelivered: int
    pending: int
    oldest_seconds: float | None

    @property
    def stream_lag(self) -> int:
        """Entries the consolidators have not finished: undelivered plus pending."""
        return self.undelivered + self.pending


async def consolidate(
    rt: Runtime, workflow_id: UUID, distiller: Distiller | None = None
) -> Consolidated | None:
    """Distil one completed workflow into its customer's long-term memory, once (see the
    module docstring); None when there is no such workflow."""
    distiller = distiller or distiller_for(rt.model)
    async with rt.db() as conn:
        tenant = await marks.tenant_of(conn, workflow_id)
        if tenant is None:
            return None
        async with tenancy.scoped(conn, tenant):
            work = await marks.lock(conn, workflow_id)
    if work is None:
        return Consolidated(workflow_id, tenant, "", None)
    # The model and the embedder are network calls: made outside any transaction. Two
    # consolidators may both distil; only the one that finds it unconsolidated under
    # the row lock below writes.
    distilled = await distiller.distill(_finished(rt, work))
    candidates = await _candidates(rt, work, distilled, distiller.name)
    async with rt.db() as conn:
        async with tenancy.scoped(conn, tenant):
            if await marks.lock(conn, workflow_id) is None:
                return Consolidated(workflow_id, tenant, "", None)  # done (or erased) meanwhile
            counts = await memory_gate.admit(
                conn,
                tenant_id=work.tenant_id,
                customer_id=work.customer_id,
                embedder=rt.embedder.name,
                candidates=candidates,
                min_confidence=rt.settings.memory_min_confidence,
                merge_similarity=rt.settings.memory_merge_similarity,
            )
            await marks.mark(conn, workflow_id)
    return Consolidated(workflow_id, work.tenant_id, work.customer_id, counts)


def _finished(rt: Runtime, work: marks.Completed) -> Finished:
    declared = rt.app.pipelines.get(work.pipeline)
    key = declared.input_key if declared else "input"
    given = work.first_state.get(key, work.first_state)
    return Finished(
        input=given if isinstance(given, dict) else {key: given},
        state=work.state,
        transcript=work.transcript,
    )


async def _candidates(
    rt: Runtime, work: marks.Completed, distilled: Distilled, distiller: str
) -> list[Candidate]:
    """The summary and the facts as memories to gate, embedded, each with its source."""
    authors = {m.id: m for m in work.transcript}
    last_reply = next((m for m in reversed(work.transcript) if m.role == "agent"), None)

    def source(message_id: int | None) -> Source:
        line = authors.get(message_id) if message_id is not None else None
        step = work.steps.get(line.author) if line is not None and line.role == "agent" else None
        return Source(work.id, step, line.id if line is not None else None)

    metadata = {"distiller": distiller, "pipeline": work.pipeline}
    wanted: list[tuple[str, str, str, float, Source]] = [
        (
            SUMMARY_KIND,
            f"{SUMMARY_KIND}:{work.id}",
            distilled.summary,
            1.0,
            source(last_reply.id if last_reply else None),
        )
    ]
    wanted += [
        (f.kind, f.key, f.content, f.confidence, source(f.message_id)) for f in distilled.facts
    ]
    vectors = await rt.embedder.embed_many([content for _, _, content, _, _ in wanted])
    return [
        Candidate(kind, key, content, confidence, vector, src, metadata)
        for (kind, key, content, confidence, src), vector in zip(wanted, vectors, strict=True)
    ]


async def requeue_unconsolidated(
    rt: Runtime, *, older_than: float = REQUEUE_AFTER_SECONDS, limit: int = REQUEUE_BATCH
) -> int:
    """Re-add lost consolidations to the stream from Postgres; returns how many.

    A workflow is lost when it completed (consolidating) more than ``older_than``
    seconds before the newest entry the consolidators have taken, or before now when
    nothing waits undelivered, and is still unconsolidated: its entry never reached
    Redis (a crash before the handoff) or Redis lost it. While the stream holds
    undelivered entries, anything completed after the last delivered one may still
    be among them, so it is left alone. A duplicate is harmless (it is skipped).
    """
    state = await queue.state(rt.redis, rt.keys)
    if not state.exists:
        await queue.ensure_group(rt.redis, rt.keys)
    elif state.undelivered:
        if state.last_delivered_ms is None:
            return 0  # nothing was ever taken: everything may still be waiting
        older_than += max(state.now_ms - state.last_delivered_ms, 0) / 1000
    async with rt.db() as conn:
        ids = await marks.unconsolidated(conn, older_than=older_than, limit=limit)
    with redis_errors():
        await queue.enqueue(rt.redis, rt.keys, ids)
    if ids:
        log.warning("re-added %d lost consolidation(s) to the stream", len(ids))
    return len(ids)


async def lag(rt: Runtime) -> ConsolidationLag:
    """The consolidation lag now (see ``ConsolidationLag``)."""
    with redis_errors():
        state = await queue.state(rt.redis, rt.keys)
    async with rt.db() as conn:
        oldest = await marks.oldest_age(conn)
    return ConsolidationLag(state.undelivered, state.pending, oldest)


def observe_lag(meter: Meter, latest: Callable[[], ConsolidationLag | None]) -> None:
    """Register observable gauges of the consolidation lag on ``meter``, read from
    ``latest`` (the last measurement: gauge callbacks cannot await a query)."""

    def gauge(pick: Callable[[ConsolidationLag], float | None]) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            measured = latest()
            value = pick(measured) if measured is not None else None
            return [Observation(value)] if value is not None else []

        return observe

    meter.create_observable_gauge(
        "orchestrator.consolidation.stream_lag",
        callbacks=[gauge(lambda m: m.stream_lag)],
        unit="{entry}",
        description="consolidation stream entries not yet consolidated",
    )
    meter.create_observable_gauge(
        "orchestrator.consolidation.oldest_unconsolidated",
        callbacks=[gauge(lambda m: m.oldest_seconds)],
        unit="s",
        description="age of the oldest completed workflow not yet consolidated",
    )


class Consolidator:
    """One consolidation consumer; its knobs are its arguments (see the module docstring)."""

    def __init__(
        self,
        runtime: Runtime,
        consumer: str,
        *,
        count: int = 16,
        concurrency: int = 4,
        distiller: Distiller | None = None,
        meter: Meter | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        self.rt = runtime
        # Entries idle this long are taken over (their consolidator died or hung).
        self.lease_seconds = lease_seconds or runtime.settings.lease_seconds
        self.consumer = consumer
        self.count = count
        # Entries of one read consolidated at once (one customer's wait on its lock).
        self.concurrency = concurrency
        self.distiller = distiller or distiller_for(runtime.model)
        self.consolidated = 0  # workflows this consolidator distilled (skips not counted)
        self.latest_lag: ConsolidationLag | None = None
        self._meter = meter
        self._cursor: bytes | str = "0-0"
        self._due = {"reclaim": 0.0, "lag": 0.0}
        if meter is not None:
            observe_lag(meter, lambda: self.latest_lag)

    async def run(self, stop: anyio.Event) -> None:
        """Consolidate until ``stop``; any outage is logged once and waited out."""
        failing, delay = False, 0.1
        while not stop.is_set():
            try:
                await self.once()
                await self._measure()
            except OUTAGE as exc:
                if not failing:
                    log.warning("consolidation: %s; retrying until it is back", exc)
                failing = True
                with anyio.move_on_after(delay):
                    await stop.wait()
                delay = min(delay * 2, 5.0)
                continue
            if failing:
                log.warning("consolidation: back to normal")
            failing, delay = False, 0.1

    async def once(self, *, block_ms: int | None = None) -> int:
        """One round: take entries (idle ones first, when due; else new ones, waiting at
        most ``block_ms``), consolidate each, acknowledge them. Returns entries handled."""
        try:
            entries = await self._take(block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # No group yet, or Redis lost the stream: (re)create it, read next round.
            await queue.ensure_group(self.rt.redis, self.rt.keys)
            return 0
        rt, finished = self.rt, list[bytes]()
        written: set[tuple[str, str]] = set()  # (tenant, customer) whose memories changed
        slots = anyio.CapacityLimiter(self.concurrency)
        outages: list[BaseException] = []

        async def handle(entry: Entry) -> None:
            # Never raises: one entry's outage or defect must not cancel the others.
            try:
                async with slots:
                    result = await self._handle(entry)
            except OUTAGE as exc:
                outages.append(exc)  # the entry stays pending: taken again later
                return
            except Exception:
                log.exception("consolidation entry %r: unexpected error", entry.id)
                return  # stays pending, taken over after the lease
            if result is not None:
                finished.append(entry.id)
                if result.counts is not None:
                    written.add((result.tenant_id, result.customer_id))

        try:
            async with anyio.create_task_group() as tg:
                for entry in entries:
                    tg.start_soon(handle, entry)
            if outages:
                raise outages[0]
        finally:
            # Acknowledge what committed even when an outage cuts the round short; in the
            # same round trip, recalls cached before these writes stop matching.
            bumps = [
                partial(recall_cache.bump_in, keys=rt.keys, tenant=t, customer=c)
                for t, c in sorted(written)
            ]
            with contextlib.suppress(*OUTAGE):
                await queue.done(rt.redis, rt.keys, finished, also=bumps)
        return len(entries)

    async def _take(self, block_ms: int | None) -> list[Entry]:
        rt, now = self.rt, anyio.current_time()
        if now >= self._due["reclaim"]:
            self._due["reclaim"] = now + self.lease_seconds / 2
            self._cursor, entries = await queue.reclaim(
                rt.redis,
                rt.keys,
                self.consumer,
                min_idle_ms=int(self.lease_seconds * 1000),
                count=self.count,
                start=self._cursor,
            )
            if entries:
                return entries
        return await queue.read(
            rt.redis,
            rt.keys,
            self.consumer,
            count=self.count,
            block_ms=rt.settings.block_ms if block_ms is None else block_ms,
        )

    async def _handle(self, entry: Entry) -> Consolidated | None:
        """Consolidate one entry; what was done when it is finished (to acknowledge),
        None when it was dead-lettered or stays pending."""
        try:
            workflow_id = queue.decode(entry)
        except InvalidInput as exc:
            await self._dead_letter(entry, str(exc), None)
            return None
        try:
            result = await consolidate(self.rt, workflow_id, self.distiller)
        except OUTAGE:
            raise
        except AgentError as exc:
            if not exc.non_retryable:
                # The model is unavailable for now: the entry stays pending and is taken
                # again after the lease.
                log.warning("consolidating %s: %s; will retry", workflow_id, exc)
                return None
            await self._dead_letter(entry, f"{type(exc).__name__}: {exc}", workflow_id)
            return None
        except Exception as exc:
            log.exception("consolidating %s failed", workflow_id)
            await self._dead_letter(entry, f"{type(exc).__name__}: {exc}", workflow_id)
            return None
        if result is None:  # no such workflow (pruned, forgotten): nothing to do
            return Consolidated(workflow_id, "", "", None)
        if result.counts is not None:
            self.consolidated += 1
        return result

    async def _dead_letter(self, entry: Entry, reason: str, workflow_id: UUID | None) -> None:
        """Keep the entry as a dead letter in Postgres (its failures count against the
        workflow's retry budget; the last one gives it up) and on the dead-letter stream,
        then acknowledge it."""
        log.warning(
            "dead-lettering consolidation entry %r (workflow %s): %s", entry.id, workflow_id, reason
        )
        raw = {_text(k): _text(v) for k, v in entry.fields.items()}
        async with self.rt.db() as conn, conn.transaction():
            await dead_letters.add(
                conn,
                agent=queue.AGENT,
                reason=reason,
                envelope=json.dumps(raw),
                workflow_id=workflow_id,
            )
            if workflow_id is not None and await marks.give_up_if_spent(
                conn, workflow_id, source=queue.AGENT, max_failures=MAX_FAILURES
            ):
                log.warning(
                    "gave up consolidating workflow %s after %d failures", workflow_id, MAX_FAILURES
                )
        with redis_errors():
            await queue.dead_letter(self.rt.redis, self.rt.keys, entry, reason)

    async def _measure(self) -> None:
        now = anyio.current_time()
        if self._meter is None or now < self._due["lag"]:
            return
        self._due["lag"] = now + LAG_EVERY_SECONDS
        self.latest_lag = await lag(self.rt)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
