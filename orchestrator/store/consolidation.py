"""Consolidation marks in Postgres: the durable queue of workflows to distil.

A completed workflow of a consolidating pipeline (``workflows.consolidate``) waits
with ``consolidated_at`` NULL (the partial index ``workflows_unconsolidated``) until
the one transaction that writes its memories sets it. Reading a workflow's
transcript takes its tenant (``tenancy.scoped``); finding the tenant and the
waiting workflows is the engine's view of every tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from orchestrator.models.distill import Line
from orchestrator.store import Conn

SELECT_TENANT = "SELECT tenant_id FROM workflows WHERE id = $1"
# In the tenant's transaction: the row lock makes a second consolidator wait, then skip.
LOCK_WORKFLOW = """
SELECT w.id, w.tenant_id, w.session_id, s.customer_id, w.pipeline, w.status, w.input,
       w.state, w.consolidate, w.consolidated_at
FROM workflows w JOIN sessions s ON s.id = w.session_id
WHERE w.id = $1
FOR UPDATE OF w
"""
TRANSCRIPT = """
SELECT id, role, author, content FROM messages
WHERE session_id = $1 AND workflow_id = $2
ORDER BY id
"""
# A message names its author (the agent), not its step: the agent's last completed step.
STEPS_BY_AGENT = """
SELECT DISTINCT ON (agent) agent, id FROM steps
WHERE workflow_id = $1 AND status = 'completed'
ORDER BY agent, seq DESC
"""
MARK_CONSOLIDATED = "UPDATE workflows SET consolidated_at = now() WHERE id = $1"
# With its last dead letter ($3 open ones from the queue $2: the retry budget), a
# consolidation is given up: the workflow leaves workflows_unconsolidated, so the scans
# below never read it again (before, every pass read and counted each one given up).
GIVE_UP = """
UPDATE workflows w SET consolidate = false
WHERE w.id = $1 AND w.consolidate AND w.consolidated_at IS NULL
  AND (SELECT count(*) FROM dead_letters d
       WHERE d.workflow_id = w.id AND d.agent = $2 AND d.retried_at IS NULL) >= $3
RETURNING w.id
"""
# Completed at least $1 seconds ago (given-up ones are not consolidating any more).
UNCONSOLIDATED = """
SELECT w.id FROM workflows w
WHERE w.consolidate AND w.status = 'completed' AND w.consolidated_at IS NULL
  AND w.completed_at < now() - make_interval(secs => $1)
ORDER BY w.completed_at
LIMIT $2
"""
OLDEST_UNCONSOLIDATED = """
SELECT extract(epoch FROM now() - min(completed_at))::float8 FROM workflows
WHERE consolidate AND status = 'completed' AND consolidated_at IS NULL
"""


@dataclass(frozen=True, slots=True)
class Completed:
    """A locked workflow to consolidate: whose it is and what it was."""

    id: UUID
    tenant_id: str
    session_id: str
    customer_id: str
    pipeline: str
    first_state: dict[str, Any]  # the input column: the input under the pipeline's key
    state: dict[str, Any]
    transcript: list[Line]
    steps: dict[str, UUID]  # agent -> its last completed step (a message's source step)


async def tenant_of(conn: Conn, workflow_id: UUID) -> str | None:
    """The workflow's tenant (from its row), or None when there is no such workflow."""
    tenant: str | None = await conn.fetchval(SELECT_TENANT, workflow_id)
    return tenant


async def lock(conn: Conn, workflow_id: UUID) -> Completed | None:
    """Lock the workflow (FOR UPDATE) in the caller's tenant-scoped transaction and read
    it; None when it is gone, not completed, not consolidating or consolidated already."""
    row = await conn.fetchrow(LOCK_WORKFLOW, workflow_id)
    if (
        row is None
        or row["status"] != "completed"
        or not row["consolidate"]
        or row["consolidated_at"] is not None
    ):
        return None
    messages = await conn.fetch(TRANSCRIPT, row["session_id"], workflow_id)
    steps = await conn.fetch(STEPS_BY_AGENT, workflow_id)
    return Completed(
        id=row["id"],
        tenant_id=row["tenant_id"],
        session_id=row["session_id"],
        customer_id=row["customer_id"],
        pipeline=row["pipeline"],
        first_state=row["input"],
        state=row["state"] or {},
        transcript=[Line(m["id"], m["role"], m["author"], m["content"]) for m in messages],
        steps={s["agent"]: s["id"] for s in steps},
    )


async def mark(conn: Conn, workflow_id: UUID) -> None:
    """Record the workflow consolidated (in the transaction that wrote its memories)."""
    await conn.execute(MARK_CONSOLIDATED, workflow_id)


async def give_up_if_spent(
    conn: Conn, workflow_id: UUID, *, source: str, max_failures: int
) -> bool:
    """Give up consolidating the workflow once it has ``max_failures`` open dead letters
    from ``source`` (call it in the transaction that adds one); whether it was given up."""
    return await conn.fetchval(GIVE_UP, workflow_id, source, max_failures) is not None


async def unconsolidated(conn: Conn, *, older_than: float, limit: int) -> list[UUID]:
    """Completed, consolidating workflows not yet consolidated (nor given up), completed
    more than ``older_than`` seconds ago; oldest first, at most ``limit``."""
    rows = await conn.fetch(UNCONSOLIDATED, older_than, limit)
    return [r["id"] for r in rows]


async def oldest_age(conn: Conn) -> float | None:
    """Seconds since the oldest completed-but-unconsolidated workflow completed (None:
    there is none): the durable consolidation lag."""
    age: float | None = await conn.fetchval(OLDEST_UNCONSOLIDATED)
    return age
