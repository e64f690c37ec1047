"""The store interface: the named operations the engine and the client call.

Each operation borrows a pooled connection for itself (bounded in time;
infrastructure failures raise ``ServiceUnavailable``) and runs the aggregate
module's function; multi-statement operations are one transaction there. So
the engine says *what* happens to a step or a workflow (``complete``, ``fail``,
``park``, ``requeue``, ``cancel``, ``signal``...) and never holds a raw
connection. ``tests/test_store.py`` is its own suite, against real Postgres.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from orchestrator.batching import Combiner
from orchestrator.connections import PG_DOWN
from orchestrator.errors import Parked
from orchestrator.schemas import Event, TaskEnvelope, WorkflowRecord, WorkflowStatus
from orchestrator.schemas.story import Story
from orchestrator.store import (
    Conn,
    costs,
    dead_letters,
    erasure,
    events,
    history,
    prune,
    recovery,
    schedules,
    steps,
    tool_runs,
    transcripts,
    waits,
    workflows,
)
from orchestrator.store import memory as memory_store
from orchestrator.store.dead_letters import DeadLetter
from orchestrator.store.read_ahead import ReadAhead
from orchestrator.store.tool_runs import ToolRun

Connect = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]
OPEN_BATCH = 64  # open reads pipelined in one round trip
COMPLETE_BATCH = 64  # completions pipelined in one round trip and one transaction


class Store:
    """Postgres, the truth, behind named operations (see the module docstring)."""

    def __init__(self, connect: Connect, *, read_ahead_seconds: float = 0.0) -> None:
        self._connect = connect
        # Open reads of the steps this process's submits and completions just created.
        self.read_ahead = ReadAhead(read_ahead_seconds)
        # Group commit: concurrent steps' open reads and completions share round trips
        # (and completions one commit); one step alone is sent at once.
        self._opens = Combiner(self._open_many, max_batch=OPEN_BATCH)
        self._completions = Combiner(self._complete_many, max_batch=COMPLETE_BATCH)

    @property
    def memory(self) -> memory_store.MemoryStore:
        """Long-term memory: remember, recall (tenant-scoped transactions)."""
        return memory_store.MemoryStore(self._connect)

    @property
    def transcripts(self) -> transcripts.TranscriptStore:
        """Transcripts and a workflow's tool outputs, read back per tenant."""
        return transcripts.TranscriptStore(self._connect)

    @property
    def costs(self) -> costs.CostStore:
        """Tenants' model costs and budgets (``orchestrator budget``)."""
        return costs.CostStore(self._connect)

    @property
    def erasure(self) -> erasure.ErasureStore:
        """Erasing one customer of one tenant (``orchestrator forget``)."""
        return erasure.ErasureStore(self._connect)

    # Workflows
    async def submit(self, submission: workflows.Submission) -> workflows.Created:
        """Record a submitted workflow; its first step's envelope is for the caller to XADD.
        Not batched: measured, one transaction of many submissions cost Postgres more
        CPU per workflow (2.6 against 1.9 ms) than one each."""
        async with self._connect() as conn:
            created = await workflows.create(conn, submission)
        if created.opened is not None:
            self.read_ahead.put(created.envelope, created.opened)
        return created

    async def workflow(self, workflow_id: UUID) -> WorkflowRecord:
        """A workflow with its steps; WorkflowNotFound if unknown."""
        async with self._connect() as conn:
            return await workflows.get(conn, workflow_id)

    async def events_after(
        self, workflow_id: UUID, after_id: int = 0, limit: int = 500
    ) -> list[Event]:
        """The workflow's audit events numbered above ``after_id``, oldest first."""
        async with self._connect() as conn:
            return await events.after(conn, workflow_id, after_id, limit)

    async def resolve_workflow(self, prefix: str) -> UUID:
        """The one workflow whose id starts with ``prefix`` (any case, dashes as in the
        id or none); InvalidInput when none does, several do, or it cannot start an id."""
        async with self._connect() as conn:
            return await history.resolve_workflow_prefix(conn, prefix)

    async def story(self, workflow_id: UUID) -> Story:
        """The whole story of a workflow (``orchestrator show``); WorkflowNotFound."""
        async with self._connect() as conn:
            return await history.story(conn, workflow_id)

    async def workflow_status(self, workflow_id: UUID) -> WorkflowStatus:
        """A workflow's status; WorkflowNotFound if unknown."""
        async with self._connect() as conn:
            return await recovery.workflow_status(conn, workflow_id)

    async def terminal(
        self, workflow_ids: list[UUID], statuses: Iterable[WorkflowStatus] = workflows.TERMINAL
    ) -> dict[UUID, WorkflowStatus]:
        """The statuses of those of ``workflow_ids`` that have finished (or, with
        ``statuses``, are in one of those)."""
        async with self._connect() as conn:
            return await workflows.terminal_statuses(conn, workflow_ids, statuses)

    async def recent(
        self,
        *,
        status: str | None,
        tenant: str | None,
        limit: int,
        order: workflows.RunOrder = workflows.RunOrder.CREATED,
    ) -> list[dict[str, Any]]:
        """Workflows newest (or costliest) first, optionally by status and tenant."""
        async with self._connect() as conn:
            return await workflows.recent(
                conn, status=status, tenant=tenant, limit=limit, order=order
            )

    async def cancel(self, workflow_id: UUID) -> list[TaskEnvelope] | None:
        """Cancel an unfinished workflow (None if finished); returns what starts next."""
        async with self._connect() as conn:
            return await recovery.cancel(conn, workflow_id)

    async def resume(self, workflow_id: UUID) -> list[TaskEnvelope]:
        """Re-open a failed or stuck workflow; returns the envelopes to enqueue."""
        async with self._connect() as conn:
            return await recovery.resume(conn, workflow_id)

    async def signal(
        self,
        workflow_id: UUID,
        name: str,
        payload: Any,
        transcript: tuple[str, str, str] | None = None,
    ) -> TaskEnvelope | None:
        """Record a signal; returns the envelope of the step it woke, if one waited."""
        async with self._connect() as conn:
            return await waits.send_signal(conn, workflow_id, name, payload, transcript=transcript)

    # Steps: the step protocol
    async def open(self, envelope: TaskEnvelope) -> steps.OpenStep:
        """Whether the step may run under this envelope's fence, and what it recorded
        (read with the concurrent steps' reads, in one round trip)."""
        return await self._opens(envelope)

    def opened_ahead(self, envelope: TaskEnvelope) -> steps.OpenStep | None:
        """What ``open`` would return, when this process's submit or completion just created
        the step (``store.read_ahead``): no read needed. None: ``open`` it."""
        return self.read_ahead.take(envelope)

    async def _open_many(self, envelopes: Sequence[TaskEnvelope]) -> list[steps.OpenStep]:
        async with self._connect() as conn:
            return await steps.open_steps(conn, envelopes)

    async def take_over(self, envelope: TaskEnvelope, by: str) -> TaskEnvelope | None:
        """A new fence for a redelivered step; None when closed or not due."""
        async with self._connect() as conn:
            return await steps.take_over(conn, envelope, by)

    async def complete(
        self,
        envelope: TaskEnvelope,
        outcome: steps.Outcome,
        opened: steps.OpenStep,
        joins: frozenset[str],
    ) -> steps.Completed:
        """Close the step fenced on its attempt and hand off; FenceRejected if it lost.
        A linear completion shares its round trip and commit with the concurrent ones."""
        one = steps.linear(envelope, outcome, opened, joins)
        if one is None:
            async with self._connect() as conn:
                return await steps.complete(conn, envelope, outcome, opened, joins)
        row = await self._completions(one)
        if isinstance(row, Exception):
            raise row
        completed, session = steps.linear_result(one, row)
        if one.ready is not None and completed.status is WorkflowStatus.RUNNING:
            for handed in completed.next:  # before any promotion: only this workflow's
                self.read_ahead.put(handed, one.ready)
        if session is None:
            return completed
        async with self._connect() as conn:
            return await steps.promote_after(conn, completed, session)

    async def _complete_many(self, items: Sequence[steps.Linear]) -> list[Any]:
        """One transaction for the batch, in step id order (two batches lock rows in the
        same order: no deadlock between them). A statement's error aborts the whole
        transaction: then each is sent alone, so one bad completion fails by itself."""
        order = sorted(range(len(items)), key=lambda i: items[i].envelope.step_id)
        rows: list[Any] = [None] * len(items)
        async with self._connect() as conn:
            try:
                sent = await steps.complete_linear(conn, [items[i] for i in order])
            except asyncpg.PostgresError as exc:
                if len(items) == 1 or isinstance(exc, PG_DOWN):
                    raise  # an outage, or one completion's own error: as if sent alone
                sent = [await self._complete_alone(conn, items[i]) for i in order]
        for i, row in zip(order, sent, strict=True):
            rows[i] = row
        return rows

    @staticmethod
    async def _complete_alone(conn: Conn, item: steps.Linear) -> Any:
        try:
            return (await steps.complete_linear(conn, [item]))[0]
        except asyncpg.PostgresError as exc:
            if isinstance(exc, PG_DOWN):
                raise
            return exc  # this completion's own error, raised to its caller only

    async def fail(
        self,
        envelope: TaskEnvelope,
        *,
        error: str,
        retry_after: float | None,
        recorded: list[ToolRun],
        worker: str,
        started_at: datetime,
        usage: steps.ModelUse,
        optional_join: str | None,
        events: Sequence[tuple[str, dict[str, Any]]] = (),
    ) -> steps.Failure:
        """Record a failed attempt: retry later, end a tolerated branch, or dead-letter;
        ``events`` (what the run did) are recorded with it."""
        async with self._connect() as conn:
            return await steps.fail(
                conn,
                envelope,
                error=error,
                retry_after=retry_after,
                recorded=recorded,
                worker=worker,
                started_at=started_at,
                usage=usage,
                optional_join=optional_join,
                events=events,
            )

    async def park(
        self,
        envelope: TaskEnvelope,
        parked: Parked,
        *,
        ordinal: int,
        recorded: list[ToolRun],
        worker: str,
        started_at: datetime,
        usage: steps.ModelUse,
    ) -> waits.Parking:
        """Park the step on a signal or a timer (or re-run it if the signal is there)."""
        async with self._connect() as conn:
            return await steps.park(
                conn,
                envelope,
                parked,
                ordinal=ordinal,
                recorded=recorded,
                worker=worker,
                started_at=started_at,
                usage=usage,
            )

    async def poison(self, *, agent: str, reason: str, envelope: str) -> int:
        """Keep an unreadable stream entry as a dead letter."""
        async with self._connect() as conn:
            return await dead_letters.add(conn, agent=agent, reason=reason, envelope=envelope)

    async def heartbeat(self, running: list[tuple[UUID, int]]) -> set[UUID]:
        """Refresh running steps (id, attempt); returns those still at that attempt."""
        async with self._connect() as conn:
            return await recovery.heartbeat(conn, running)

    # Recovery and timers
    async def stalled(self, *, older_than: float) -> list[recovery.Stalled]:
        """Open steps with no progress for ``older_than`` seconds (or whose retry is due)."""
        async with self._connect() as conn:
            return await recovery.stalled(conn, older_than=older_than)

    async def requeue(
        self, step_id: UUID, *, reason: str, seen_attempt: int | None = None
    ) -> TaskEnvelope | None:
        """Bump an open step's fence (only from ``seen_attempt``); its new envelope."""
        async with self._connect() as conn:
            return await recovery.requeue(conn, step_id, reason=reason, seen_attempt=seen_attempt)

    async def promote_stalled_sessions(self) -> list[TaskEnvelope]:
        """Start the next workflow of sessions whose promotion was lost."""
        started: list[TaskEnvelope] = []
        async with self._connect() as conn:
            for session_id in await recovery.stalled_sessions(conn):
                started += await recovery.promote_next(conn, session_id)
        return started

    async def busy(self, *, within: float) -> tuple[int, int]:
        """Queued steps that will run, and timers due, ``within`` seconds from now."""
        async with self._connect() as conn:
            return await recovery.busy(conn, within=within)

    async def wake_due(self, *, limit: int = 100) -> list[TaskEnvelope]:
        """Wake steps whose timer is due; their envelopes, to enqueue."""
        async with self._connect() as conn:
            return await waits.wake_due(conn, limit=limit)

    async def take_signal(
        self,
        workflow_id: UUID,
        step_id: UUID,
        attempt: int,
        *,
        name: str,
        ordinal: int,
        deadline: float | None,
    ) -> tuple[bool, Any]:
        """Take a pending signal for a step's wait, fenced on its attempt; (False, None) if
        none."""
        async with self._connect() as conn:
            return await waits.take_signal(
                conn, workflow_id, step_id, attempt, name=name, ordinal=ordinal, deadline=deadline
            )

    # The tool ledger
    async def start_tool_run(
        self, workflow_id: UUID, step_id: UUID, attempt: int, run: ToolRun, timeout: float
    ) -> bool:
        """Commit a non-idempotent call's 'started' row (fenced); False if the key exists."""
        async with self._connect() as conn:
            return await tool_runs.start(conn, workflow_id, step_id, attempt, run, timeout)

    async def tool_run(self, key: str) -> ToolRun | None:
        """The ledger row of a call, by idempotency key."""
        async with self._connect() as conn:
            return await tool_runs.fetch(conn, key)

    async def take_tool_run(
        self,
        seen: ToolRun,
        *,
        step_id: UUID,
        attempt: int,
        status: str,
        result: Any = None,
        timeout: float = 0.0,
    ) -> bool:
        """Make another execution's settled or lapsed call this one's (fenced on the row)."""
        async with self._connect() as conn:
            return await tool_runs.take(
                conn,
                seen,
                step_id=step_id,
                attempt=attempt,
                status=status,
                result=result,
                timeout=timeout,
            )

    async def finish_tool_run(self, run: ToolRun, attempt: int) -> bool:
        """Record a call's outcome, only by its owner while unsettled; False otherwise."""
        async with self._connect() as conn:
            return await tool_runs.finish(conn, run, attempt)

    # Memory, dead letters, schedules, pruning
    async def dead_letters(self, *, include_retried: bool, limit: int) -> list[DeadLetter]:
        """Dead letters, newest first."""
        async with self._connect() as conn:
            return await dead_letters.list_letters(
                conn, include_retried=include_retried, limit=limit
            )

    async def dead_letter(self, letter_id: int) -> DeadLetter | None:
        """One dead letter, or None."""
        async with self._connect() as conn:
            return await dead_letters.get(conn, letter_id)

    async def sight_schedule(self, name: str, cron: str, first_tick: datetime) -> datetime | None:
        """The last tick a schedule handled; on first sight, record ``first_tick``."""
        async with self._connect() as conn:
            return await schedules.sight(conn, name, cron, first_tick)

    async def advance_schedule(self, name: str, tick: datetime) -> bool:
        """Record ``tick`` as handled if later than the stored one; True if it moved."""
        async with self._connect() as conn:
            return await schedules.advance(conn, name, tick)

    async def prune_memories(
        self, *, half_life_days: float, prune_below: float, retention_days: float | None
    ) -> prune.PruneReport:
        """Delete memories whose decayed confidence fell below ``prune_below``, or older
        than ``retention_days``."""
        async with self._connect() as conn:
            return await prune.prune_memories(
                conn,
                half_life_days=half_life_days,
                prune_below=prune_below,
                retention_days=retention_days,
            )

    async def prune(
        self,
        *,
        older_than_seconds: float,
        on_batch: Callable[[prune.PruneReport], None] | None = None,
    ) -> prune.PruneReport:
        """Delete the history of workflows finished longer ago than ``older_than_seconds``
        (``on_batch`` sees the running total after each batch)."""
        async with self._connect() as conn:
            return await prune.prune_finished(
                conn, older_than_seconds=older_than_seconds, on_batch=on_batch
            )
