"""Erasure of one customer of one tenant (``orchestrator forget``), in ONE transaction.

What goes, and how:

- deleted: the transcripts (messages of the customer's sessions), the long-term memories
  of the customer and any memory distilled from one of their workflows (its source), the
  checkpoints and the tool runs (pure payload: only a workflow that can still move
  needs them, and such a workflow is refused, see below);
- blanked, the rows kept as skeletons (status, timings, attempts, tokens) so counts,
  history and foreign keys hold: workflow input and state, step input, output, question
  and replies, event data, signal payloads (``{"erased": true}``), error texts and dead
  letters (``[erased]``); the workflow's idempotency key is dropped, it is marked pruned
  (never resumed) and consolidated (never distilled again);
- re-keyed: a session id is chosen by the caller and may name the customer, so each
  session is replaced by an anonymous one (``erased-<uuid>``, no customer) that its
  workflows move to.

A customer with an unfinished workflow (queued, running, waiting) is refused: a step in
flight would write payloads back. Cancel it first (``forget --cancel`` does).

The audit record (table ``erasures``) holds an erasure id, the tenant, the counts per
table and the time: no customer id, nor a hash of one. The Redis side (working memory,
recall caches, stream entries) is for the caller, with the sessions and workflows of the
``Plan``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from uuid import UUID

from orchestrator.errors import InvalidInput
from orchestrator.store import Conn, prune, tenancy

ERASED_SESSION_PREFIX = "erased-"
UNFINISHED = ("queued", "running", "waiting")

# The tenant is set on the transaction (tenancy.scoped); it is repeated in the WHERE
# clauses so the engine scope (which sees every tenant's sessions) cannot widen them.
SESSIONS = """
SELECT id FROM sessions WHERE tenant_id = $1 AND customer_id = $2 ORDER BY id
"""
LOCK_SESSIONS = """
SELECT id FROM sessions WHERE tenant_id = $1 AND customer_id = $2 ORDER BY id FOR UPDATE
"""
WORKFLOWS = """
SELECT id, status FROM workflows
WHERE tenant_id = $1 AND session_id = ANY($2::text[]) ORDER BY created_at, id
"""
# Locked before anything changes: a consolidation of one of them (it locks the workflow
# row too) either finished before, its memories are deleted here, or sees it erased.
LOCK_WORKFLOWS = """
SELECT id, status FROM workflows
WHERE tenant_id = $1 AND session_id = ANY($2::text[]) ORDER BY id FOR UPDATE
"""
DELETE_MESSAGES = """
WITH gone AS (DELETE FROM messages WHERE tenant_id = $1 AND session_id = ANY($2::text[])
              RETURNING 1)
SELECT count(*) FROM gone
"""
# A tenant-wide memory ('') distilled from one of their workflows goes too.
DELETE_MEMORIES = """
WITH gone AS (
    DELETE FROM memories
    WHERE tenant_id = $1 AND (customer_id = $2 OR source_workflow = ANY($3::uuid[]))
    RETURNING 1
)
SELECT count(*) FROM gone
"""
BLANK_ATTEMPTS = """
WITH blanked AS (
    UPDATE step_attempts SET error = '[erased]'
    WHERE step_id = ANY(ARRAY(SELECT id FROM steps WHERE workflow_id = ANY($1::uuid[])))
      AND error IS NOT NULL
    RETURNING 1
)
SELECT count(*) FROM blanked
"""
BLANK_STEPS = """
WITH blanked AS (
    UPDATE steps
    SET input = '{"erased": true}',
        output = CASE WHEN output IS NULL THEN NULL ELSE '{"erased": true}'::jsonb END,
        error = CASE WHEN error IS NULL THEN NULL ELSE '[erased]' END,
        question = CASE WHEN question IS NULL THEN NULL ELSE '[erased]' END,
        replies = '[]'
    WHERE workflow_id = ANY($1::uuid[])
    RETURNING 1
)
SELECT count(*) FROM blanked
"""
BLANK_EVENTS = """
WITH blanked AS (
    UPDATE events SET data = '{"erased": true}' WHERE workflow_id = ANY($1::uuid[])
    RETURNING 1
)
SELECT count(*) FROM blanked
"""
BLANK_SIGNALS = """
WITH blanked AS (
    UPDATE signals SET payload = '{"erased": true}' WHERE workflow_id = ANY($1::uuid[])
    RETURNING 1
)
SELECT count(*) FROM blanked
"""
BLANK_DEAD_LETTERS = """
WITH blanked AS (
    UPDATE dead_letters SET envelope = '{"erased": true}', reason = '[erased]'
    WHERE workflow_id = ANY($1::uuid[])
    RETURNING 1
)
SELECT count(*) FROM blanked
"""
# $1 old session ids, $2 their anonymous replacements (same order).
INSERT_ANONYMOUS_SESSIONS = """
INSERT INTO sessions (id, tenant_id, customer_id, created_at)
SELECT n.new_id, s.tenant_id, '', s.created_at
FROM sessions s JOIN unnest($1::text[], $2::text[]) AS n(old_id, new_id) ON s.id = n.old_id
"""
BLANK_WORKFLOWS = """
WITH blanked AS (
    UPDATE workflows w
    SET session_id = n.new_id,
        input = '{"erased": true}',
        state = '{"erased": true}',
        error = CASE WHEN w.error IS NULL THEN NULL ELSE '[erased]' END,
        submit_key = NULL,
        pruned_at = coalesce(w.pruned_at, now()),
        consolidated_at = CASE WHEN w.consolidate THEN coalesce(w.consolidated_at, now())
                               ELSE w.consolidated_at END,
        updated_at = now()
    FROM unnest($1::text[], $2::text[]) AS n(old_id, new_id)
    WHERE w.session_id = n.old_id
    RETURNING 1
)
SELECT count(*) FROM blanked
"""
DELETE_SESSIONS = """
WITH gone AS (DELETE FROM sessions WHERE id = ANY($1::text[]) RETURNING 1)
SELECT count(*) FROM gone
"""
RECORD_ERASURE = """
INSERT INTO erasures (id, tenant_id, counts) VALUES ($1, $2, $3) RETURNING erased_at
"""

Connect = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]


@dataclass(frozen=True, slots=True)
class Plan:
    """What an erasure of the customer would touch: their sessions and the workflows of
    them (id to status), read in one tenant-scoped transaction."""

    sessions: tuple[str, ...]
    workflows: Mapping[UUID, str]

    @property
    def unfinished(self) -> list[UUID]:
        """The workflows still queued, running or waiting (erasure refuses them)."""
        return [w for w, status in self.workflows.items() if status in UNFINISHED]


@dataclass(frozen=True, slots=True)
class Erasure:
    """A done erasure: its audit id, tenant and counts per table (``counts`` is what the
    audit record holds); ``plan`` is what it erased (for the Redis side, never stored)."""

    erasure_id: UUID
    tenant_id: str
    counts: Mapping[str, int]
    plan: Plan = field(repr=False)


def check_customer(customer_id: str) -> None:
    """InvalidInput for an empty customer id: '' is the tenant's shared knowledge."""
    if not customer_id:
        raise InvalidInput("forget needs a customer id ('' is the tenant's shared knowledge)")


def refuse_unfinished(plan: Plan) -> None:
    """InvalidInput naming the unfinished workflows of ``plan``, if any."""
    unfinished = plan.unfinished
    if unfinished:
        shown = ", ".join(str(w) for w in unfinished[:3]) + (", ..." if len(unfinished) > 3 else "")
        raise InvalidInput(
            f"the customer has {len(unfinished)} unfinished workflow(s) ({shown}): "
            "cancel them first, or pass --cancel"
        )


async def plan(conn: Conn, *, tenant_id: str, customer_id: str) -> Plan:
    """The customer's sessions and workflows, as they are now (nothing is locked)."""
    check_customer(customer_id)
    async with tenancy.scoped(conn, tenant_id):
        sessions = [r["id"] for r in await conn.fetch(SESSIONS, tenant_id, customer_id)]
        rows = await conn.fetch(WORKFLOWS, tenant_id, sessions)
    return Plan(tuple(sessions), {r["id"]: r["status"] for r in rows})


async def erase(
    conn: Conn, *, tenant_id: str, customer_id: str, extra_counts: Mapping[str, int] | None = None
) -> Erasure:
    """Erase the customer (see the module docstring) and write the audit record, in one
    tenant-scoped transaction; InvalidInput, with nothing changed, when a workflow of
    theirs is unfinished. ``extra_counts`` (the Redis side's, say) join the audit's."""
    check_customer(customer_id)
    async with tenancy.scoped(conn, tenant_id):
        sessions = [r["id"] for r in await conn.fetch(LOCK_SESSIONS, tenant_id, customer_id)]
        rows = await conn.fetch(LOCK_WORKFLOWS, tenant_id, sessions)
        found = Plan(tuple(sessions), {r["id"]: r["status"] for r in rows})
        refuse_unfinished(found)
        ids = list(found.workflows)
        renamed = [f"{ERASED_SESSION_PREFIX}{uuid.uuid4()}" for _ in sessions]
        counts = {
            "messages": await conn.fetchval(DELETE_MESSAGES, tenant_id, sessions),
            "memories": await conn.fetchval(DELETE_MEMORIES, tenant_id, customer_id, ids),
            "checkpoints": await conn.fetchval(prune.DELETE_CHECKPOINTS, ids),
            "tool_runs": await conn.fetchval(prune.DELETE_TOOL_RUNS, ids),
            "step_attempts": await conn.fetchval(BLANK_ATTEMPTS, ids),
            "steps": await conn.fetchval(BLANK_STEPS, ids),
            "events": await conn.fetchval(BLANK_EVENTS, ids),
            "signals": await conn.fetchval(BLANK_SIGNALS, ids),
            "dead_letters": await conn.fetchval(BLANK_DEAD_LETTERS, ids),
        }
        await conn.execute(INSERT_ANONYMOUS_SESSIONS, sessions, renamed)
        counts["workflows"] = await conn.fetchval(BLANK_WORKFLOWS, sessions, renamed)
        counts["sessions"] = await conn.fetchval(DELETE_SESSIONS, sessions)
        counts.update(extra_counts or {})
        erasure_id = uuid.uuid4()
        await conn.fetchval(RECORD_ERASURE, erasure_id, tenant_id, counts)
    return Erasure(erasure_id, tenant_id, counts, found)


class ErasureStore:
    """Erasure behind named operations; each borrows a pooled connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def plan(self, *, tenant_id: str, customer_id: str) -> Plan:
        """The customer's sessions and workflows (see ``plan``)."""
        async with self._connect() as conn:
            return await plan(conn, tenant_id=tenant_id, customer_id=customer_id)

    async def erase(
        self, *, tenant_id: str, customer_id: str, extra_counts: Mapping[str, int] | None = None
    ) -> Erasure:
        """Erase the customer and record the audit (see ``erase``)."""
        async with self._connect() as conn:
            return await erase(
                conn, tenant_id=tenant_id, customer_id=customer_id, extra_counts=extra_counts
            )
