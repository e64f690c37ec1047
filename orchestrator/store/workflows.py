"""Workflows, their sessions and transcripts: creating and reading them."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from orchestrator.errors import InvalidInput, WorkflowNotFound
from orchestrator.store import Conn
from schemas import (
    StepRecord,
    StepStatus,
    TaskEnvelope,
    Ticket,
    WorkflowRecord,
    WorkflowStatus,
)

# The whole submission as ONE statement: session, workflow, first message,
# first step and event, or nothing when the session belongs to another tenant.
CREATE_WORKFLOW = """
WITH new_session AS (
    INSERT INTO sessions (id, tenant_id, customer_id) VALUES ($3, $4, $5)
    ON CONFLICT (id) DO NOTHING
    RETURNING tenant_id
), owner AS (
    SELECT tenant_id FROM new_session
    UNION ALL
    SELECT tenant_id FROM sessions WHERE id = $3
    LIMIT 1
), workflow_row AS (
    INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state, app_version)
    SELECT $1, $4, $3, $6, 'running', $7, $7, $8 FROM owner WHERE tenant_id = $4
    RETURNING id
), message_row AS (
    INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content)
    SELECT $3, $4, id, 'customer', $5, $9 FROM workflow_row
), step_row AS (
    INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, input)
    SELECT $2, id, 0, $10, 'submit', 'queued', $7 FROM workflow_row
), event_row AS (
    INSERT INTO events (workflow_id, step_id, type, data)
    SELECT id, NULL, 'workflow.submitted', $11 FROM workflow_row
)
SELECT count(*) FROM workflow_row
"""
SELECT_WORKFLOW = """
SELECT id, tenant_id, session_id, pipeline, status, input, state, error, app_version,
       created_at, completed_at
FROM workflows WHERE id = $1
"""
SELECT_STEPS = """
SELECT id, workflow_id, seq, agent, status, attempt, output, error, created_at, completed_at
FROM steps WHERE workflow_id = $1 ORDER BY seq
"""
SELECT_TERMINAL = """
SELECT id, status FROM workflows
WHERE id = ANY($1::uuid[]) AND status IN ('completed', 'failed', 'cancelled')
"""
SELECT_TRANSCRIPT = """
SELECT role, author, content, created_at FROM messages
WHERE session_id = $1 ORDER BY id
"""


async def create(
    conn: Conn,
    ticket: Ticket,
    *,
    pipeline: str,
    first_agent: str,
    app_version: str,
    traceparent: str | None = None,
) -> TaskEnvelope:
    """Record a submitted ticket; return the first step's envelope for the caller to XADD."""
    workflow_id, step_id = uuid4(), uuid4()
    session_id = ticket.session_id or f"session-{workflow_id}"
    state: dict[str, Any] = {"ticket": ticket.model_dump(mode="json")}
    created = await conn.fetchval(
        CREATE_WORKFLOW,
        workflow_id,
        step_id,
        session_id,
        ticket.tenant_id,
        ticket.customer_id,
        pipeline,
        state,
        app_version,
        f"{ticket.subject}\n\n{ticket.body}",
        first_agent,
        {"pipeline": pipeline, "first_agent": first_agent},
    )
    if not created:
        raise InvalidInput(f"session {session_id} belongs to another tenant")
    return TaskEnvelope(
        workflow_id=workflow_id,
        step_id=step_id,
        seq=0,
        pipeline=pipeline,
        agent=first_agent,
        attempt=1,
        tenant_id=ticket.tenant_id,
        assigned_by="submit",
        payload=state,
        traceparent=traceparent,
    )


async def get(conn: Conn, workflow_id: UUID) -> WorkflowRecord:
    row = await conn.fetchrow(SELECT_WORKFLOW, workflow_id)
    if row is None:
        raise WorkflowNotFound(workflow_id)
    steps = tuple(
        StepRecord(**{**dict(s), "status": StepStatus(s["status"])})
        for s in await conn.fetch(SELECT_STEPS, workflow_id)
    )
    return WorkflowRecord(**{**dict(row), "status": WorkflowStatus(row["status"]), "steps": steps})


async def terminal_statuses(conn: Conn, workflow_ids: list[UUID]) -> dict[UUID, WorkflowStatus]:
    """Statuses of those of ``workflow_ids`` that have finished."""
    rows = await conn.fetch(SELECT_TERMINAL, workflow_ids)
    return {r["id"]: WorkflowStatus(r["status"]) for r in rows}


async def transcript(conn: Conn, session_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(SELECT_TRANSCRIPT, session_id)]
