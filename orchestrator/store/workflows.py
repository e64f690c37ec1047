"""Workflows, their sessions and transcripts: creating and reading them."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from orchestrator.errors import InvalidInput, WorkflowNotFound
from orchestrator.store import Conn
from schemas import (
    EventType,
    StepRecord,
    StepStatus,
    TaskEnvelope,
    Ticket,
    WorkflowRecord,
    WorkflowStatus,
)

UPSERT_SESSION = """
INSERT INTO sessions (id, tenant_id, customer_id) VALUES ($1, $2, $3)
ON CONFLICT (id) DO NOTHING
"""
# A session id is global; refusing another tenant's id keeps transcripts apart.
SESSION_TENANT = "SELECT tenant_id FROM sessions WHERE id = $1"
INSERT_WORKFLOW = """
INSERT INTO workflows (id, tenant_id, session_id, pipeline, status, input, state, app_version)
VALUES ($1, $2, $3, $4, 'running', $5, $5, $6)
"""
INSERT_MESSAGE = """
INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content)
VALUES ($1, $2, $3, $4, $5, $6)
"""
INSERT_FIRST_STEP = """
INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, input)
VALUES ($1, $2, 0, $3, 'submit', 'queued', $4)
"""
INSERT_EVENT = "INSERT INTO events (workflow_id, step_id, type, data) VALUES ($1, $2, $3, $4)"
SELECT_WORKFLOW = """
SELECT id, tenant_id, session_id, pipeline, status, input, state, error, app_version,
       created_at, completed_at
FROM workflows WHERE id = $1
"""
SELECT_STEPS = """
SELECT id, workflow_id, seq, agent, status, attempt, output, error, created_at, completed_at
FROM steps WHERE workflow_id = $1 ORDER BY seq
"""
SELECT_STATUSES = "SELECT id, status FROM workflows WHERE id = ANY($1::uuid[])"
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
    async with conn.transaction():
        await conn.execute(UPSERT_SESSION, session_id, ticket.tenant_id, ticket.customer_id)
        owner = await conn.fetchval(SESSION_TENANT, session_id)
        if owner != ticket.tenant_id:
            raise InvalidInput(f"session {session_id} belongs to another tenant")
        await conn.execute(
            INSERT_WORKFLOW, workflow_id, ticket.tenant_id, session_id, pipeline, state, app_version
        )
        await conn.execute(
            INSERT_MESSAGE,
            session_id,
            ticket.tenant_id,
            workflow_id,
            "customer",
            ticket.customer_id,
            f"{ticket.subject}\n\n{ticket.body}",
        )
        await conn.execute(INSERT_FIRST_STEP, step_id, workflow_id, first_agent, state)
        await conn.execute(
            INSERT_EVENT,
            workflow_id,
            None,
            EventType.WORKFLOW_SUBMITTED.value,
            {"pipeline": pipeline, "first_agent": first_agent},
        )
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


async def statuses(conn: Conn, workflow_ids: list[UUID]) -> dict[UUID, WorkflowStatus]:
    rows = await conn.fetch(SELECT_STATUSES, workflow_ids)
    return {r["id"]: WorkflowStatus(r["status"]) for r in rows}


async def transcript(conn: Conn, session_id: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await conn.fetch(SELECT_TRANSCRIPT, session_id)]
