"""Parallel branches and joins, settled under the workflow row's lock.

A step whose ``route()`` names several agents forks: each becomes an open step
(a branch). The workflow row counts its open steps (``open_steps``) and hands
out step numbers (``next_seq``), so branches never collide. A branch routing to
a join agent ends there: the first one creates the join step as ``pending``
(``workflows.join_step``); when the last open branch ends, the join is queued
on the merged state of every branch, exactly once: only the transaction that
brings ``open_steps`` to zero promotes it, and the promotion is conditional on
the join still being pending. With no join pending, the last branch to end
completes the workflow.

Every function here runs inside the caller's transaction, after the step's own
row was written (lock order: step rows before the workflow row, as everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from orchestrator.errors import AgentError, WorkflowNotFound
from orchestrator.schemas import EventType, TaskEnvelope, WorkflowStatus
from orchestrator.store import Conn, envelopes, ids, recovery
from orchestrator.store import events as audit

# NO KEY UPDATE, not UPDATE: the step's own transaction already holds KEY SHARE on this
# row (the foreign key checks of the checkpoint, events and tool runs it inserted), and
# so does every sibling branch ending at the same moment; FOR UPDATE conflicts with
# those, and two branches ending together deadlock. NO KEY UPDATE still serializes them.
#
# The row alone: after waiting for the lock, Postgres re-reads only the locked row, so
# a row joined in the same statement (the join step another branch just created) would
# be the stale one. The join's agent is read next, in a statement of its own.
LOCK_WORKFLOW = """
SELECT status, next_seq, open_steps, join_step, state FROM workflows
WHERE id = $1
FOR NO KEY UPDATE
"""
JOIN_AGENT = "SELECT agent FROM steps WHERE id = $1"
INSERT_STEPS = """
INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, input, traceparent)
SELECT i, $1, q, a, $2, s, $3, $8
FROM unnest($4::uuid[], $5::int[], $6::text[], $7::text[]) AS x(i, q, a, s)
"""
# Conditional on 'pending': a join is promoted once, whatever happens around it.
PROMOTE_JOIN = """
UPDATE steps SET status = 'queued', input = $2, updated_at = now(),
                 traceparent = coalesce($3, traceparent)
WHERE id = $1 AND status = 'pending'
RETURNING id, seq, agent, assigned_by, attempt
"""
UPDATE_WORKFLOW = """
UPDATE workflows
SET state = $2, status = $3, next_seq = $4, open_steps = $5, join_step = $6,
    updated_at = now(),
    completed_at = CASE WHEN $3 IN ('completed', 'failed', 'cancelled')
                        THEN coalesce(completed_at, now()) END
WHERE id = $1
"""


@dataclass(slots=True)
class _Workflow:
    """The locked workflow row, changed in memory, then written back once."""

    id: UUID
    status: str
    next_seq: int
    open_steps: int
    join_step: UUID | None
    join_agent: str | None
    state: dict[str, Any]
    events: list[tuple[EventType, dict[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Settled:
    """What a branch's end committed: envelopes to enqueue, the workflow's status."""

    next: list[TaskEnvelope]
    status: WorkflowStatus


async def _lock(conn: Conn, workflow_id: UUID) -> _Workflow:
    row = await conn.fetchrow(LOCK_WORKFLOW, workflow_id)
    if row is None:
        raise WorkflowNotFound(workflow_id)
    join_step = row["join_step"]
    join_agent = None if join_step is None else await conn.fetchval(JOIN_AGENT, join_step)
    return _Workflow(
        workflow_id,
        row["status"],
        row["next_seq"],
        row["open_steps"],
        join_step,
        join_agent,
        dict(row["state"]),
    )


async def settle(
    conn: Conn,
    envelope: TaskEnvelope,
    *,
    state: dict[str, Any],
    next_agents: tuple[str, ...],
    joins: frozenset[str],
    traceparent: str | None,
) -> Settled:
    """A completed step that forks, is a branch, or reaches a join: start its next
    branches, create or promote the join, or end the workflow."""
    wf = await _lock(conn, envelope.workflow_id)
    if wf.status == WorkflowStatus.CANCELLED:
        return Settled([], WorkflowStatus.CANCELLED)  # nothing more starts, ever
    # Failed by another branch meanwhile (or resumed, queued behind its session): nothing
    # starts now, but the branch's end is recorded all the same (its next steps created,
    # not enqueued; the join stays pending), so the resumed workflow goes on from the fork
    # as it is: resume re-enqueues its queued steps, the resumed branch ends the fork.
    stopped = wf.status != WorkflowStatus.RUNNING
    wf.state = {**wf.state, **state}
    wf.open_steps -= 1
    rows: list[tuple[UUID, int, str, str]] = []
    handed: list[TaskEnvelope] = []
    for agent in next_agents:
        if agent in joins:
            if wf.join_step is None:
                wf.join_step, wf.join_agent = ids.time_ordered(), agent
                rows.append((wf.join_step, wf.next_seq, agent, "pending"))
                wf.next_seq += 1
            elif wf.join_agent != agent:
                raise AgentError(
                    f"routes to join {agent!r} while join {wf.join_agent!r} is pending; "
                    "a workflow has one join at a time",
                    non_retryable=True,
                )
            continue
        step = envelopes.next_step(
            envelope,
            step_id=ids.time_ordered(),
            seq=wf.next_seq,
            agent=agent,
            state=state,
            traceparent=traceparent,
        )
        rows.append((step.step_id, step.seq, agent, "queued"))
        handed.append(step)
        wf.next_seq += 1
        wf.open_steps += 1
    if rows:
        await conn.execute(
            INSERT_STEPS,
            envelope.workflow_id,
            envelope.agent,
            state,
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [r[3] for r in rows],
            traceparent or envelope.traceparent,
        )
    if len(handed) > 1:
        wf.events.append((EventType.WORKFLOW_FORKED, {"branches": [e.agent for e in handed]}))
    if stopped:
        # The failed branch is still counted open: no join promotion, no completion here.
        return await _write(conn, envelope, wf, [])
    handed += await _after_branch_end(conn, envelope, wf, traceparent)
    return await _write(conn, envelope, wf, handed)


async def fail_branch(
    conn: Conn, envelope: TaskEnvelope, *, error: str, join: str | None
) -> Settled | None:
    """A step of a branched workflow failed for good. With ``join`` (the pipeline's join
    that declares optional branches) the branch just ends, its error kept in the state
    under ``branch_errors``; otherwise None: the caller fails the workflow.

    When the last open branch fails before any branch reached the join, the join is
    created then: it runs once, on every branch's error.
    """
    wf = await _lock(conn, envelope.workflow_id)
    # A branch: others are open, a join is pending, or an earlier branch failed already.
    branched = wf.open_steps > 1 or wf.join_step is not None or "branch_errors" in wf.state
    if not branched or join is None or envelope.agent == join:
        return None
    if wf.status != WorkflowStatus.RUNNING:
        return None
    errors = dict(wf.state.get("branch_errors") or {})
    errors[envelope.agent] = error
    wf.state["branch_errors"] = errors
    wf.open_steps -= 1
    if wf.open_steps == 0 and wf.join_step is None:
        wf.join_step, wf.join_agent = ids.time_ordered(), join
        await conn.execute(
            INSERT_STEPS,
            envelope.workflow_id,
            envelope.agent,
            wf.state,
            [wf.join_step],
            [wf.next_seq],
            [join],
            ["pending"],
            envelope.traceparent,
        )
        wf.next_seq += 1
    handed = await _after_branch_end(conn, envelope, wf, envelope.traceparent)
    return await _write(conn, envelope, wf, handed)


async def _after_branch_end(
    conn: Conn, envelope: TaskEnvelope, wf: _Workflow, traceparent: str | None
) -> list[TaskEnvelope]:
    """The last open branch ended: promote the pending join, or complete the workflow."""
    if wf.open_steps > 0:
        return []
    if wf.join_step is None:
        wf.status = WorkflowStatus.COMPLETED.value
        wf.events.append((EventType.WORKFLOW_COMPLETED, {}))
        return []
    row = await conn.fetchrow(
        PROMOTE_JOIN, wf.join_step, wf.state, traceparent or envelope.traceparent
    )
    wf.join_step, wf.join_agent = None, None
    if row is None:  # not pending any more (cannot happen under the lock; stay safe)
        wf.status = WorkflowStatus.COMPLETED.value
        return []
    wf.open_steps = 1
    wf.events.append((EventType.JOIN_STARTED, {"agent": row["agent"], "seq": row["seq"]}))
    return [
        envelopes.next_step(
            envelope,
            step_id=row["id"],
            seq=row["seq"],
            agent=row["agent"],
            state=wf.state,
            traceparent=traceparent,
            attempt=row["attempt"],
            assigned_by=row["assigned_by"],
        )
    ]


async def _write(
    conn: Conn, envelope: TaskEnvelope, wf: _Workflow, handed: list[TaskEnvelope]
) -> Settled:
    await conn.execute(
        UPDATE_WORKFLOW,
        wf.id,
        wf.state,
        wf.status,
        wf.next_seq,
        wf.open_steps,
        wf.join_step,
    )
    await audit.record(conn, wf.id, envelope.step_id, wf.events)
    status = WorkflowStatus(wf.status)
    if status.terminal:
        # Tickets waiting behind it in its session may start.
        handed = handed + await recovery.promote_after(conn, wf.id)
    return Settled(handed, status)
