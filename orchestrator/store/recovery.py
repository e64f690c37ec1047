"""Recovery in Postgres: find stalled steps, re-enqueue, heartbeat, cancel and resume.

Every re-enqueue bumps the step's attempt, so whoever still runs the old
attempt is fenced out and an old envelope still in a stream is skipped. The
attempt is the fence only: failures (the retry budget) are counted apart.

Lock order, everywhere: a workflow's step rows before its workflow row (the
completion's order), so cancel, input and resume never deadlock with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from orchestrator.errors import InvalidInput, WorkflowNotFound
from orchestrator.schemas import EventType, TaskEnvelope, WorkflowStatus
from orchestrator.store import Conn, dead_letters, envelopes
from orchestrator.store import events as audit

# Open steps with no progress for a while (or whose retry time has come):
# their envelope may be lost with Redis, or their worker dead.
# Driven by steps_stalled (oldest queued first), each step's workflow read by key: a join
# from workflows read every running workflow per pass (benchmarks/explain.py: 941 ->
# 10,620 buffers with 2,000 running; 157 this way).
# A retry counts as enqueued when it falls due (not_before), not when it was scheduled:
# one whose backoff outlasts the stall time is not stalled the moment it is due.
SELECT_STALLED = """
SELECT s.id, s.agent, s.attempt, s.workflow_id, s.seq,
       (extract(epoch FROM greatest(s.updated_at, s.not_before)) * 1000)::bigint AS updated_ms,
       extract(epoch FROM now() - greatest(s.updated_at, s.not_before))::float8 AS idle_seconds
FROM steps s
WHERE s.status = 'queued' AND s.updated_at < now() - make_interval(secs => $1)
  AND (s.not_before IS NULL OR s.not_before < now() - make_interval(secs => $1))
  AND (SELECT w.status FROM workflows w WHERE w.id = s.workflow_id) = 'running'
ORDER BY s.updated_at
LIMIT $2
"""
# $2: the attempt the caller saw (NULL: whatever it is now).
REQUEUE_STEP = """
UPDATE steps s SET attempt = s.attempt + 1, updated_at = now(), not_before = NULL
FROM workflows w
WHERE s.id = $1 AND s.status = 'queued' AND w.id = s.workflow_id AND w.status = 'running'
  AND ($2::int IS NULL OR s.attempt = $2)
RETURNING s.id, s.workflow_id, s.seq, s.agent, s.assigned_by, s.attempt,
          coalesce(s.input, w.state) AS input, s.traceparent, w.tenant_id, w.pipeline
"""
# Running steps prove they are alive (the fallback once Redis is lost), in one
# statement per worker; a step missing from the answer was fenced out.
HEARTBEAT = """
UPDATE steps s SET updated_at = now()
FROM unnest($1::uuid[], $2::int[]) AS x(id, attempt)
WHERE s.id = x.id AND s.attempt = x.attempt AND s.status = 'queued'
RETURNING s.id
"""
LOCK_OPEN_STEPS = """
SELECT id FROM steps WHERE workflow_id = $1 AND status IN ('pending', 'queued', 'waiting')
ORDER BY seq FOR UPDATE
"""
WORKFLOW_STATUS = "SELECT status FROM workflows WHERE id = $1"
PRUNED_AT = "SELECT pruned_at FROM workflows WHERE id = $1"
CANCEL_WORKFLOW = """
UPDATE workflows SET status = 'cancelled', updated_at = now(), completed_at = now()
WHERE id = $1 AND status IN ('queued', 'running', 'waiting')
RETURNING id
"""
CANCEL_STEPS = """
UPDATE steps SET status = 'cancelled', updated_at = now(), completed_at = now()
WHERE workflow_id = $1 AND status IN ('pending', 'queued', 'waiting')
"""
# A resumed step gets its retry budget back (failures = 0) and a new fence.
REOPEN_FAILED_STEP = """
UPDATE steps SET status = 'queued', attempt = attempt + 1, failures = 0, error = NULL,
                 not_before = NULL,
                 completed_at = NULL, updated_at = now()
WHERE workflow_id = $1 AND status = 'failed'
RETURNING id
"""
# Its session may have moved on to a later ticket meanwhile: then it queues again.
REOPEN_WORKFLOW = """
UPDATE workflows w
SET status = CASE WHEN EXISTS (SELECT 1 FROM workflows a
                               WHERE a.session_id = w.session_id AND a.id <> w.id
                                 AND a.status IN ('running', 'waiting'))
                  THEN 'queued' ELSE 'running' END,
    error = NULL, completed_at = NULL, updated_at = now()
WHERE id = $1
RETURNING status
"""
OPEN_STEP_IDS = "SELECT id FROM steps WHERE workflow_id = $1 AND status = 'queued' ORDER BY seq"
# run_until_idle: open steps that will run without anything from outside, by the time $1
# (seconds from now). A queued step of a queued workflow waits behind its session; a
# waiting one with no due time waits for a signal.
BUSY_STEPS = """
SELECT count(*) FILTER (WHERE s.status = 'queued' AND w.status = 'running'
                          AND (s.not_before IS NULL OR s.not_before <= due.at)) AS queued,
       count(*) FILTER (WHERE s.status = 'waiting' AND s.not_before <= due.at) AS timers
FROM steps s JOIN workflows w ON w.id = s.workflow_id,
     (SELECT now() + make_interval(secs => $1) AS at) AS due
WHERE s.status IN ('queued', 'waiting') AND w.status IN ('running', 'waiting')
"""


@dataclass(frozen=True, slots=True)
class Stalled:
    """An open step of a running workflow that has made no progress for too long."""

    step_id: UUID
    agent: str
    # When the step was last enqueued (a retry: when it fell due) or heartbeated (Postgres clock).
    updated_ms: int
    attempt: int
    workflow_id: UUID
    seq: int
    # Seconds since then (Postgres clock): how long its last execution, if any, has been
    # silent (the takeover time a requeue reports).
    idle_seconds: float = 0.0


async def stalled(conn: Conn, *, older_than: float, limit: int = 500) -> list[Stalled]:
    """Up to ``limit`` open steps of running workflows not enqueued (a retry: due) or
    heartbeated for ``older_than`` seconds, oldest first."""
    rows = await conn.fetch(SELECT_STALLED, older_than, limit)
    return [
        Stalled(
            r["id"],
            r["agent"],
            r["updated_ms"],
            r["attempt"],
            r["workflow_id"],
            r["seq"],
            r["idle_seconds"],
        )
        for r in rows
    ]


async def requeue(
    conn: Conn, step_id: UUID, *, reason: str = "requeued", seen_attempt: int | None = None
) -> TaskEnvelope | None:
    """Bump an open step's attempt (fencing out whoever runs it now); return its new envelope.

    With ``seen_attempt``, only if the step is still at that attempt."""
    async with conn.transaction():
        row = await conn.fetchrow(REQUEUE_STEP, step_id, seen_attempt)
        if row is None:
            return None
        await audit.record(
            conn,
            row["workflow_id"],
            row["id"],
            [(EventType.STEP_REQUEUED, {"attempt": row["attempt"], "reason": reason})],
        )
    return envelopes.of_row(row)


async def heartbeat(conn: Conn, running: list[tuple[UUID, int]]) -> set[UUID]:
    """Refresh running steps (id, attempt); return the ids whose attempt is still current."""
    if not running:
        return set()
    rows = await conn.fetch(HEARTBEAT, [r[0] for r in running], [r[1] for r in running])
    return {r["id"] for r in rows}


async def workflow_status(conn: Conn, workflow_id: UUID) -> WorkflowStatus:
    """The workflow's status; raises WorkflowNotFound."""
    status = await conn.fetchval(WORKFLOW_STATUS, workflow_id)
    if status is None:
        raise WorkflowNotFound(workflow_id)
    return WorkflowStatus(status)


async def cancel(conn: Conn, workflow_id: UUID) -> list[TaskEnvelope] | None:
    """Cancel an unfinished workflow (None if it had finished); its running step sees it
    at the next boundary. Returns what starts next in its session, to enqueue."""
    async with conn.transaction():
        await conn.execute(LOCK_OPEN_STEPS, workflow_id)  # steps first: see the module doc
        if await conn.fetchval(CANCEL_WORKFLOW, workflow_id) is None:
            await workflow_status(conn, workflow_id)  # raises if unknown
            return None
        await conn.execute(CANCEL_STEPS, workflow_id)
        await audit.record(conn, workflow_id, None, [(EventType.WORKFLOW_CANCELLED, {})])
        return await promote_after(conn, workflow_id)


async def resume(conn: Conn, workflow_id: UUID) -> list[TaskEnvelope]:
    """Re-open a failed workflow at its failed step, or re-enqueue a stuck one's open steps.

    Tool results recorded by earlier attempts stay in the ledger and are reused.
    """
    async with conn.transaction():
        status = await workflow_status(conn, workflow_id)
        if status in (WorkflowStatus.COMPLETED, WorkflowStatus.CANCELLED):
            raise InvalidInput(f"workflow {workflow_id} is {status.value}; nothing to resume")
        if await conn.fetchval(PRUNED_AT, workflow_id) is not None:
            # Its tool ledger is gone: a resumed step could repeat a non-idempotent call.
            raise InvalidInput(f"workflow {workflow_id} was pruned; it cannot be resumed")
        await audit.record(
            conn, workflow_id, None, [(EventType.WORKFLOW_RESUMED, {"from": status.value})]
        )
        if status is WorkflowStatus.FAILED:
            # Every failed step (several when parallel branches failed) re-opens under a
            # new attempt; their old attempt rows stay.
            reopened_ids = [r["id"] for r in await conn.fetch(REOPEN_FAILED_STEP, workflow_id)]
            if not reopened_ids:
                raise InvalidInput(f"workflow {workflow_id} failed without a failed step")
            now = await conn.fetchval(REOPEN_WORKFLOW, workflow_id)
            await dead_letters.mark_workflow_retried(conn, workflow_id)
            if now == WorkflowStatus.QUEUED:
                return []  # behind a later ticket of its session: promoted when that ends
            # Sibling branches stopped when the workflow failed: they go on, new fences.
            siblings = [r["id"] for r in await conn.fetch(OPEN_STEP_IDS, workflow_id)]
            rows = [
                await conn.fetchrow(REQUEUE_STEP, s, None)
                for s in siblings
                if s not in reopened_ids
            ]
            rows += [await conn.fetchrow(SELECT_STEP_ENVELOPE, s) for s in reopened_ids]
            return [envelopes.of_row(row) for row in rows if row is not None]
        # Stuck: re-enqueue its open steps under new attempts (fencing out any old run).
        step_ids = [r["id"] for r in await conn.fetch(OPEN_STEP_IDS, workflow_id)]
        rows = [await conn.fetchrow(REQUEUE_STEP, step_id, None) for step_id in step_ids]
    return [envelopes.of_row(row) for row in rows if row is not None]


SELECT_STEP_ENVELOPE = """
SELECT s.id, s.workflow_id, s.seq, s.agent, s.assigned_by, s.attempt,
       coalesce(s.input, w.state) AS input, s.traceparent, w.tenant_id, w.pipeline
FROM steps s JOIN workflows w ON w.id = s.workflow_id WHERE s.id = $1
"""


# Start the session's oldest queued workflow, if none of it is active any more.
PROMOTE_NEXT = """
WITH next AS (
    UPDATE workflows SET status = 'running', updated_at = now()
    WHERE id = (SELECT id FROM workflows WHERE session_id = $1 AND status = 'queued'
                ORDER BY created_at, id LIMIT 1)
      AND NOT EXISTS (SELECT 1 FROM workflows
                      WHERE session_id = $1 AND status IN ('running', 'waiting'))
    RETURNING id
)
UPDATE steps SET updated_at = now()
WHERE workflow_id = (SELECT id FROM next) AND status = 'queued'
RETURNING id
"""
SESSION_OF = "SELECT session_id FROM workflows WHERE id = $1"
# Sessions whose queue stalled (their active workflow finished, the promotion was lost).
STALLED_SESSIONS = """
SELECT DISTINCT q.session_id FROM workflows q
WHERE q.status = 'queued'
  AND NOT EXISTS (SELECT 1 FROM workflows a
                  WHERE a.session_id = q.session_id AND a.status IN ('running', 'waiting'))
LIMIT $1
"""


async def promote_next(conn: Conn, session_id: str) -> list[TaskEnvelope]:
    """Start the next queued workflow of a session; return its envelopes to enqueue."""
    step_ids = [r["id"] for r in await conn.fetch(PROMOTE_NEXT, session_id)]
    return [envelopes.of_row(await conn.fetchrow(SELECT_STEP_ENVELOPE, s)) for s in step_ids]


async def promote_after(conn: Conn, workflow_id: UUID) -> list[TaskEnvelope]:
    """After ``workflow_id`` finished: start whatever waited behind it in its session."""
    session_id = await conn.fetchval(SESSION_OF, workflow_id)
    return await promote_next(conn, session_id) if session_id else []


async def stalled_sessions(conn: Conn, limit: int = 100) -> list[str]:
    """Up to ``limit`` sessions with a queued workflow but none running or waiting: nothing
    will start their next one unless it is promoted."""
    return [r["session_id"] for r in await conn.fetch(STALLED_SESSIONS, limit)]


async def busy(conn: Conn, *, within: float) -> tuple[int, int]:
    """(queued steps that will run, waiting steps whose timer is due) ``within`` seconds
    from now: the work ``Worker.run_until_idle`` waits for."""
    row = await conn.fetchrow(BUSY_STEPS, within)
    return (row["queued"], row["timers"]) if row is not None else (0, 0)
