"""Transcripts read back: a customer's recent messages across their sessions, and what a
session's working memory is rebuilt from.

Messages are written elsewhere (the customer's at submit, agent lines with the
step's completion, replies with their signal). Reading them is tenant-scoped in
storage: every read runs in ``tenancy.scoped``, and row-level security hides
any other tenant's rows whatever the query says.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from orchestrator.store import Conn, tenancy

# Customers without an identity: their sessions are not one person's history.
ANONYMOUS = frozenset({"", "anonymous"})

# Newest first to use the limit, returned oldest first. Both tenant filters are kept
# (row-level security applies anyway): they let the planner use sessions_customer.
RECENT_FOR_CUSTOMER = """
SELECT * FROM (
    SELECT m.id, m.session_id, m.workflow_id, m.role, m.author, m.content, m.created_at
    FROM sessions s JOIN messages m ON m.session_id = s.id
    WHERE s.tenant_id = $1 AND s.customer_id = $2 AND m.tenant_id = $1
    ORDER BY m.id DESC
    LIMIT $3
) recent ORDER BY id
"""
RECENT_FOR_SESSION = """
SELECT * FROM (
    SELECT id, session_id, workflow_id, role, author, content, created_at
    FROM messages
    WHERE session_id = $2 AND tenant_id = $1
    ORDER BY id DESC
    LIMIT $3
) recent ORDER BY id
"""
# Tool runs have no tenant column: they are read by their workflow, whose tenant the
# caller took from the workflow row.
TOOL_OUTPUTS = """
SELECT * FROM (
    SELECT t.tool, t.result, t.finished_at, s.seq, t.ordinal
    FROM tool_runs t JOIN steps s ON s.id = t.step_id
    WHERE t.workflow_id = $1 AND t.status = 'succeeded'
    ORDER BY s.seq DESC, t.ordinal DESC
    LIMIT $2
) recent ORDER BY seq, ordinal
"""
# The rest of what working memory is rebuilt from, for one workflow: its goal (the
# latest one a step set), its last completed step, and the ids of its latest
# completed steps (whose appends the rebuilt value already holds).
WORKFLOW_MEMORY = """
SELECT
    (SELECT e.data ->> 'goal' FROM events e
     WHERE e.workflow_id = $1 AND e.type = $2 ORDER BY e.id DESC LIMIT 1) AS goal,
    coalesce((SELECT max(seq) FROM steps WHERE workflow_id = $1 AND status = 'completed'), -1)
        AS seq,
    coalesce((SELECT array_agg(id::text) FROM (
        SELECT id FROM steps WHERE workflow_id = $1 AND status = 'completed'
        ORDER BY completed_at DESC LIMIT $3) latest), '{}') AS applied
"""


@dataclass(frozen=True, slots=True)
class Message:
    """One transcript message as stored."""

    id: int
    session_id: str
    workflow_id: UUID | None
    role: str  # customer | agent | system
    author: str
    content: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ToolResult:
    """A succeeded tool run's result (JSON as stored), in call order."""

    tool: str
    result: Any


@dataclass(frozen=True, slots=True)
class WorkflowMemory:
    """Working-memory facts of one workflow: its goal, last completed step seq (-1:
    none) and the ids of its latest completed steps."""

    goal: str | None
    seq: int
    applied: tuple[str, ...]


async def recent_for_customer(
    conn: Conn, *, tenant_id: str, customer_id: str, limit: int
) -> list[Message]:
    """The customer's latest ``limit`` messages over all their sessions, oldest first.
    Only the tenant's rows are visible."""
    async with tenancy.scoped(conn, tenant_id):
        rows = await conn.fetch(RECENT_FOR_CUSTOMER, tenant_id, customer_id, limit)
    return [_message(r) for r in rows]


async def recent_for_session(
    conn: Conn, *, tenant_id: str, session_id: str, limit: int
) -> list[Message]:
    """The session's latest ``limit`` messages, oldest first (the tenant's rows only)."""
    async with tenancy.scoped(conn, tenant_id):
        rows = await conn.fetch(RECENT_FOR_SESSION, tenant_id, session_id, limit)
    return [_message(r) for r in rows]


async def tool_outputs(conn: Conn, workflow_id: UUID, *, limit: int) -> list[ToolResult]:
    """The workflow's latest ``limit`` succeeded tool results, in call order."""
    rows = await conn.fetch(TOOL_OUTPUTS, workflow_id, limit)
    return [ToolResult(r["tool"], _json(r["result"])) for r in rows]


async def workflow_memory(
    conn: Conn, workflow_id: UUID, *, goal_event: str, applied: int
) -> WorkflowMemory:
    """The workflow's goal (the latest ``goal_event`` event), last completed step and
    latest ``applied`` completed step ids."""
    row = await conn.fetchrow(WORKFLOW_MEMORY, workflow_id, goal_event, applied)
    assert row is not None  # an aggregate row, always
    return WorkflowMemory(row["goal"], row["seq"], tuple(row["applied"]))


def _message(r: Any) -> Message:
    return Message(
        r["id"], r["session_id"], r["workflow_id"], r["role"], r["author"], r["content"],
        r["created_at"],
    )  # fmt: skip


def _json(value: Any) -> Any:
    # Pools decode jsonb; a bare connection hands back text.
    return json.loads(value) if isinstance(value, str) else value


Connect = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]


class TranscriptStore:
    """Transcripts behind named operations; each borrows a pooled connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def recent_for_customer(
        self, *, tenant_id: str, customer_id: str, limit: int
    ) -> list[Message]:
        """See ``recent_for_customer``."""
        async with self._connect() as conn:
            return await recent_for_customer(
                conn, tenant_id=tenant_id, customer_id=customer_id, limit=limit
            )

    async def recent_for_session(
        self, *, tenant_id: str, session_id: str, limit: int
    ) -> list[Message]:
        """See ``recent_for_session``."""
        async with self._connect() as conn:
            return await recent_for_session(
                conn, tenant_id=tenant_id, session_id=session_id, limit=limit
            )

    async def tool_outputs(self, workflow_id: UUID, *, limit: int) -> list[ToolResult]:
        """See ``tool_outputs``."""
        async with self._connect() as conn:
            return await tool_outputs(conn, workflow_id, limit=limit)

    async def hydration(
        self,
        *,
        tenant_id: str,
        session_id: str,
        customer_id: str,
        workflow_id: UUID,
        messages: int,
        tools: int,
        goal_event: str,
        applied: int,
    ) -> tuple[list[Message], list[ToolResult], WorkflowMemory]:
        """What a session's working memory is rebuilt from, on one connection: the
        customer's recent messages (the session's alone for an anonymous customer), the
        workflow's latest tool results, and its goal and completed steps."""
        async with self._connect() as conn:
            if customer_id in ANONYMOUS:
                lines = await recent_for_session(
                    conn, tenant_id=tenant_id, session_id=session_id, limit=messages
                )
            else:
                lines = await recent_for_customer(
                    conn, tenant_id=tenant_id, customer_id=customer_id, limit=messages
                )
            results = await tool_outputs(conn, workflow_id, limit=tools)
            facts = await workflow_memory(conn, workflow_id, goal_event=goal_event, applied=applied)
        return lines, results, facts
