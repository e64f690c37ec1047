"""Dead letters: work that could not be done, kept with its reason until retried."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from orchestrator.store import Conn

INSERT = """
INSERT INTO dead_letters (workflow_id, step_id, agent, reason, envelope)
VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""
LIST_OPEN = """
SELECT id, workflow_id, step_id, agent, reason, envelope, created_at, retried_at
FROM dead_letters WHERE retried_at IS NULL ORDER BY id DESC LIMIT $1
"""
LIST_ALL = """
SELECT id, workflow_id, step_id, agent, reason, envelope, created_at, retried_at
FROM dead_letters ORDER BY id DESC LIMIT $1
"""
GET = """
SELECT id, workflow_id, step_id, agent, reason, envelope, created_at, retried_at
FROM dead_letters WHERE id = $1
"""
MARK_WORKFLOW_RETRIED = """
UPDATE dead_letters SET retried_at = now() WHERE workflow_id = $1 AND retried_at IS NULL
"""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One dead letter: the work (``envelope`` JSON) and why it failed; ``retried_at`` is
    set once its workflow was resumed."""

    id: int
    workflow_id: UUID | None
    step_id: UUID | None
    agent: str
    reason: str
    envelope: str
    created_at: datetime
    retried_at: datetime | None


async def add(
    conn: Conn,
    *,
    agent: str,
    reason: str,
    envelope: str,
    workflow_id: UUID | None = None,
    step_id: UUID | None = None,
) -> int:
    """Keep a dead letter (``envelope`` as JSON text); returns its id."""
    letter_id: int = await conn.fetchval(INSERT, workflow_id, step_id, agent, reason, envelope)
    return letter_id


async def list_letters(
    conn: Conn, *, include_retried: bool = False, limit: int = 50
) -> list[DeadLetter]:
    """The newest ``limit`` dead letters, not yet retried unless ``include_retried``."""
    rows = await conn.fetch(LIST_ALL if include_retried else LIST_OPEN, limit)
    return [DeadLetter(**dict(r)) for r in rows]


async def get(conn: Conn, letter_id: int) -> DeadLetter | None:
    """One dead letter by id, or None."""
    row = await conn.fetchrow(GET, letter_id)
    return DeadLetter(**dict(row)) if row is not None else None


async def mark_workflow_retried(conn: Conn, workflow_id: UUID) -> None:
    """Mark the workflow's open dead letters retried (it is being resumed)."""
    await conn.execute(MARK_WORKFLOW_RETRIED, workflow_id)
