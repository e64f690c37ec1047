"""Workflows, their sessions and transcripts: creating and reading them."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID

import asyncpg

from orchestrator.errors import InvalidInput, WorkflowNotFound
from orchestrator.schemas import (
    StepRecord,
    StepStatus,
    TaskEnvelope,
    WorkflowRecord,
    WorkflowStatus,
)
from orchestrator.store import Conn, ids
from orchestrator.store.steps import OpenStep

# The whole submission as ONE statement: session, workflow, first message,
# first step and event, or nothing when the session belongs to another tenant.
CREATE_WORKFLOW = """
WITH owner AS (
    -- DO UPDATE (a no-op) rather than DO NOTHING: it returns the row even when a
    -- concurrent submission created the session after this statement's snapshot.
    INSERT INTO sessions (id, tenant_id, customer_id) VALUES ($3, $4, $5)
    ON CONFLICT (id) DO UPDATE SET tenant_id = sessions.tenant_id
    RETURNING tenant_id, customer_id
), workflow_row AS (
    INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state, app_version,
                           submit_key, consolidate)
    SELECT $1, $4, $3, $6,
           CASE WHEN EXISTS (SELECT 1 FROM workflows
                             WHERE session_id = $3
                               AND status IN ('queued', 'running', 'waiting'))
                THEN 'queued' ELSE 'running' END,
           $7, $7, $8, $12, $13
    FROM owner WHERE tenant_id = $4
    ON CONFLICT (tenant_id, submit_key) WHERE submit_key IS NOT NULL DO NOTHING
    RETURNING id, status
), message_row AS (
    INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content)
    SELECT $3, $4, id, 'customer', $5, $9 FROM workflow_row
), step_row AS (
    -- No input: the first step starts from the workflow's state (migration V13).
    INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, traceparent)
    SELECT $2, id, 0, $10, 'submit', 'queued', $14 FROM workflow_row
), event_row AS (
    INSERT INTO events (workflow_id, step_id, type, data)
    SELECT id, NULL, 'workflow.submitted', $11 FROM workflow_row
)
-- What the first step's open read needs besides: the session's customer, and whether the
-- tenant has a budget (then it is read: store.read_ahead).
SELECT w.status, o.customer_id,
       EXISTS (SELECT 1 FROM tenant_budgets b WHERE b.tenant_id = $4) AS budgeted
FROM workflow_row w, owner o
"""
# A submission retried with the same key (after a timeout, say) gets the first one back.
SELECT_BY_KEY = "SELECT id FROM workflows WHERE tenant_id = $1 AND submit_key = $2"
SELECT_WORKFLOW = """
SELECT id, tenant_id, session_id, pipeline, status, input, state, error, app_version,
       created_at, completed_at
FROM workflows WHERE id = $1
"""
SELECT_STEPS = """
SELECT id, workflow_id, seq, agent, status, attempt, output, error, created_at, completed_at,
       question, waiting_for, not_before, updated_at
FROM steps WHERE workflow_id = $1 ORDER BY seq
"""
SELECT_TERMINAL = """
SELECT id, status FROM workflows WHERE id = ANY($1::uuid[]) AND status = ANY($2::text[])
"""
LIST_RECENT = """
SELECT id, tenant_id, pipeline, status, error, created_at, completed_at, cost_usd FROM workflows
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR tenant_id = $2)
ORDER BY created_at DESC LIMIT $3
"""
# Costliest first (newest first among equals). No index on cost (see migration V10).
LIST_COSTLIEST = """
SELECT id, tenant_id, pipeline, status, error, created_at, completed_at, cost_usd FROM workflows
WHERE ($1::text IS NULL OR status = $1) AND ($2::text IS NULL OR tenant_id = $2)
ORDER BY cost_usd DESC, created_at DESC LIMIT $3
"""


class RunOrder(StrEnum):
    """How ``runs`` orders workflows: newest first, or costliest first."""

    CREATED = "created"
    COST = "cost"


_LISTS = {RunOrder.CREATED: LIST_RECENT, RunOrder.COST: LIST_COSTLIEST}


@dataclass(frozen=True, slots=True)
class Created:
    """What ``create`` recorded: the first step's envelope, and whether to hold it back."""

    queued: bool  # True: behind another workflow of its session, not to be enqueued yet
    envelope: TaskEnvelope
    existing: bool = False  # the key was submitted before: this is that workflow, not new
    # The first step's open read as of this commit (store.read_ahead); None: read it (the
    # workflow is queued or was submitted before, or its tenant has a budget).
    opened: OpenStep | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    """A workflow to record: where it runs, for whom, and what it starts from."""

    pipeline: str
    first_agent: str
    state: dict[str, Any]  # the workflow state: the input under the pipeline's input key
    message: str  # the first transcript line (what the customer or caller sent)
    tenant: str
    session: str | None
    customer: str
    app_version: str
    key: str | None = None
    traceparent: str | None = None
    # The pipeline consolidates: once completed, the workflow is distilled into
    # long-term memory (the durable mark the consolidation queue is rebuilt from).
    consolidate: bool = False


async def create(conn: Conn, sub: Submission) -> Created:
    """Record a submitted workflow; return the first step's envelope for the caller to XADD.

    A workflow whose session already has one under way is recorded as ``queued``:
    it starts (in order) when the earlier one finishes.
    """
    workflow_id, step_id = ids.time_ordered(), ids.time_ordered()
    envelope_id = workflow_id
    session_id = sub.session or f"session-{workflow_id}"
    row = await _insert(
        conn,
        workflow_id,
        step_id,
        session_id,
        sub.tenant,
        sub.customer,
        sub.pipeline,
        sub.state,
        sub.app_version,
        sub.message,
        sub.first_agent,
        {"pipeline": sub.pipeline, "first_agent": sub.first_agent},
        sub.key,
        sub.consolidate,
        sub.traceparent,
    )
    status = None if row is None else row["status"]
    if status is None and sub.key is not None:
        existing = await conn.fetchval(SELECT_BY_KEY, sub.tenant, sub.key)
        if existing is not None:
            workflow_id, status = existing, WorkflowStatus.QUEUED.value
    if status is None:
        raise InvalidInput(f"session {session_id} belongs to another tenant")
    opened = None
    if row is not None and status == WorkflowStatus.RUNNING and not row["budgeted"]:
        opened = OpenStep(
            True,
            "",
            tenant_id=sub.tenant,
            session_id=session_id,
            customer_id=row["customer_id"] or "",
        )
    return Created(
        status == WorkflowStatus.QUEUED,
        TaskEnvelope(
            workflow_id=workflow_id,
            step_id=step_id,
            seq=0,
            pipeline=sub.pipeline,
            agent=sub.first_agent,
            attempt=1,
            tenant_id=sub.tenant,
            assigned_by="submit",
            payload=sub.state,
            traceparent=sub.traceparent,
        ),
        existing=workflow_id != envelope_id,
        opened=opened,
    )


async def _insert(conn: Conn, *args: Any) -> Any:
    """Insert the submission: its row (None: not inserted); a concurrent first ticket of the
    same session wins the race for 'running' (unique index), so try once more and queue
    behind it."""
    for _ in range(3):
        try:
            return await conn.fetchrow(CREATE_WORKFLOW, *args)
        except asyncpg.UniqueViolationError:
            continue
    raise InvalidInput("too much contention on this session; submit again")


async def get(conn: Conn, workflow_id: UUID) -> WorkflowRecord:
    """The workflow with its steps in order; raises WorkflowNotFound."""
    row = await conn.fetchrow(SELECT_WORKFLOW, workflow_id)
    if row is None:
        raise WorkflowNotFound(workflow_id)
    steps = tuple(
        StepRecord(**{**dict(s), "status": StepStatus(s["status"])})
        for s in await conn.fetch(SELECT_STEPS, workflow_id)
    )
    return WorkflowRecord(**{**dict(row), "status": WorkflowStatus(row["status"]), "steps": steps})


TERMINAL = frozenset(s for s in WorkflowStatus if s.terminal)


async def terminal_statuses(
    conn: Conn, workflow_ids: list[UUID], statuses: Iterable[WorkflowStatus] = TERMINAL
) -> dict[UUID, WorkflowStatus]:
    """Statuses of those of ``workflow_ids`` that have finished (or, with ``statuses``,
    that are in one of those)."""
    rows = await conn.fetch(SELECT_TERMINAL, workflow_ids, [s.value for s in statuses])
    return {r["id"]: WorkflowStatus(r["status"]) for r in rows}


async def recent(
    conn: Conn,
    *,
    status: str | None,
    tenant: str | None,
    limit: int,
    order: RunOrder = RunOrder.CREATED,
) -> list[dict[str, Any]]:
    """The first ``limit`` workflows in ``order`` (newest or costliest first), filtered by
    ``status`` and ``tenant`` when given."""
    return [dict(r) for r in await conn.fetch(_LISTS[order], status, tenant, limit)]
