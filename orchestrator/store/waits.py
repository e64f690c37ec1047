"""Durable waits: a step parked on a signal, a timer, or both (a timeout).

A parked step is ``waiting``: no worker holds it. Its due time is
``steps.not_before`` (woken by ``wake_due``, run by every worker, so it needs
no Redis); the signal it waits for is ``steps.waiting_for``. Each wait of a
step has an ordinal; ``steps.waits`` records the due time of each, and a
signal taken by a wait records (step, ordinal), so a re-run of the step
replays its earlier waits exactly.

Signals are rows: one sent before anyone waits stays until a wait takes it.
Parking on a signal and sending one serialize on a per-workflow advisory lock,
taken first (then step rows, then the workflow row, the order used
everywhere), so a signal can never slip between a wait's check and its park.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from orchestrator.errors import InvalidInput
from orchestrator.schemas import EventType, TaskEnvelope
from orchestrator.store import Conn, envelopes, recovery
from orchestrator.store import events as audit

SIGNAL_LOCK = "SELECT pg_advisory_xact_lock(hashtext('orchestrator.signal:' || $1::uuid::text))"
# Take the oldest pending signal ``$3`` for wait ($4, $5), only while the step is
# still queued at the caller's attempt (the fence), and only one sent before the
# wait's deadline ($6, epoch seconds; NULL: none), so a late signal never rewrites
# a recorded timeout.
TAKE_SIGNAL = """
UPDATE signals SET step_id = $4, ordinal = $5, taken_at = now()
WHERE id = (SELECT id FROM signals
            WHERE workflow_id = $1 AND name = $3 AND step_id IS NULL
              AND ($6::float8 IS NULL OR created_at <= to_timestamp($6))
            ORDER BY id LIMIT 1 FOR UPDATE)
  AND EXISTS (SELECT 1 FROM steps WHERE id = $4 AND attempt = $2 AND status = 'queued')
RETURNING payload
"""
# A new wait records its due time (NULL: none) at its ordinal ($8); a re-run parking on
# a recorded wait keeps it ($7: the recorded due time). Waits of this run that ended
# without parking (a sleep of nothing, a signal that was already there) have no entry
# yet: they get NULL (done at once) first, so every wait's entry sits at its ordinal,
# and the parked wait is the last one (the ordinal a signal sent to it is taken for).
PARK_STEP = """
WITH due AS (
    SELECT CASE WHEN $7::float8 IS NOT NULL THEN to_timestamp($7)
                WHEN $5::float8 IS NOT NULL THEN now() + make_interval(secs => $5)
           END AS at
)
UPDATE steps SET status = 'waiting', question = $3, waiting_for = $4, updated_at = now(),
                 not_before = (SELECT at FROM due),
                 waits = CASE
                     WHEN $6::bool
                     THEN waits
                          || coalesce((SELECT jsonb_agg(NULL::float8)
                                       FROM generate_series(1, $8 - jsonb_array_length(waits))),
                                      '[]'::jsonb)
                          || jsonb_build_array(extract(epoch FROM (SELECT at FROM due)))
                     ELSE waits END
WHERE id = $1 AND attempt = $2 AND status = 'queued'
RETURNING id
"""
# The workflow shows as waiting only when nothing else of it is open.
PARK_WORKFLOW = """
UPDATE workflows SET status = 'waiting', updated_at = now()
WHERE id = $1 AND status = 'running' AND open_steps = 1 AND join_step IS NULL
"""
# A signal that was already there: the step runs again at once, under a new fence.
RERUN_NOW = """
UPDATE steps s SET attempt = s.attempt + 1, updated_at = now(), not_before = NULL
FROM workflows w
WHERE s.id = $1 AND s.attempt = $2 AND s.status = 'queued' AND w.id = s.workflow_id
RETURNING s.id, s.workflow_id, s.seq, s.agent, s.assigned_by, s.attempt,
          coalesce(s.input, w.state) AS input, s.traceparent, w.tenant_id, w.pipeline
"""
INSERT_SIGNAL = """
INSERT INTO signals (workflow_id, name, payload)
SELECT id, $2, $3 FROM workflows WHERE id = $1 AND status IN ('queued', 'running', 'waiting')
RETURNING id
"""
WAITING_STEP = """
SELECT id, jsonb_array_length(waits) - 1 AS ordinal FROM steps
WHERE workflow_id = $1 AND status = 'waiting' AND waiting_for = $2
ORDER BY seq LIMIT 1
FOR UPDATE
"""
ASSIGN_SIGNAL = "UPDATE signals SET step_id = $2, ordinal = $3, taken_at = now() WHERE id = $1"
WAKE_STEP = """
UPDATE steps SET status = 'queued', attempt = attempt + 1, waiting_for = NULL,
                 not_before = NULL, question = NULL, updated_at = now()
WHERE id = $1 AND status = 'waiting'
RETURNING id
"""
RESUME_WORKFLOW = """
UPDATE workflows SET status = 'running', updated_at = now() WHERE id = $1 AND status = 'waiting'
"""
# Due timers, any worker: the row locks (SKIP LOCKED) let several wake different steps.
WAKE_DUE = """
WITH due AS (
    SELECT id FROM steps WHERE status = 'waiting' AND not_before <= now()
    ORDER BY not_before LIMIT $1
    FOR UPDATE SKIP LOCKED
), woken AS (
    UPDATE steps s SET status = 'queued', attempt = s.attempt + 1, waiting_for = NULL,
                       not_before = NULL, question = NULL, updated_at = now()
    FROM due WHERE s.id = due.id
    RETURNING s.id, s.workflow_id, s.seq, s.agent, s.assigned_by, s.attempt, s.input,
              s.traceparent
), resumed AS (
    UPDATE workflows SET status = 'running', updated_at = now()
    WHERE id IN (SELECT workflow_id FROM woken) AND status = 'waiting'
), event_rows AS (
    INSERT INTO events (workflow_id, step_id, type, data)
    SELECT workflow_id, id, 'step.woken', jsonb_build_object('attempt', attempt, 'by', 'timer')
    FROM woken
)
SELECT k.id, k.workflow_id, k.seq, k.agent, k.assigned_by, k.attempt,
       coalesce(k.input, w.state) AS input, k.traceparent, w.tenant_id, w.pipeline
FROM woken k JOIN workflows w ON w.id = k.workflow_id
WHERE w.status IN ('running', 'waiting')
"""
INSERT_MESSAGE = """
INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content)
SELECT session_id, tenant_id, id, $2, $3, $4 FROM workflows WHERE id = $1
"""


@dataclass(frozen=True, slots=True)
class Parking:
    """What parking committed: nothing to enqueue (it waits), or the step again at once
    (the signal it waits for had already arrived)."""

    rerun: TaskEnvelope | None


async def take_signal(
    conn: Conn,
    workflow_id: UUID,
    step_id: UUID,
    attempt: int,
    *,
    name: str,
    ordinal: int,
    deadline: float | None,
) -> tuple[bool, Any]:
    """Take the oldest pending signal ``name`` for the step's wait ``ordinal`` (fenced
    on the step's attempt; only one sent by ``deadline``); (False, None) if none."""
    async with conn.transaction():
        await conn.execute(SIGNAL_LOCK, workflow_id)
        row = await conn.fetchrow(
            TAKE_SIGNAL, workflow_id, attempt, name, step_id, ordinal, deadline
        )
    return (False, None) if row is None else (True, row["payload"])


async def park(
    conn: Conn,
    envelope: TaskEnvelope,
    *,
    name: str | None,
    delay: float | None,
    due: float | None,
    new: bool,
    ordinal: int,
    question: str | None,
) -> Parking | None:
    """Park the step (inside the caller's transaction); None when its fence moved.

    Waiting for a signal that is already there does not park: the signal is taken
    for this wait and the step runs again at once.
    """
    if name is not None:
        await conn.execute(SIGNAL_LOCK, envelope.workflow_id)
        deadline = due if due is not None else None
        taken = await conn.fetchrow(
            TAKE_SIGNAL,
            envelope.workflow_id,
            envelope.attempt,
            name,
            envelope.step_id,
            ordinal,
            None if new else deadline,
        )
        if taken is not None:
            row = await conn.fetchrow(RERUN_NOW, envelope.step_id, envelope.attempt)
            return None if row is None else Parking(envelopes.of_row(row))
    parked = await conn.fetchval(
        PARK_STEP, envelope.step_id, envelope.attempt, question, name, delay, new, due, ordinal
    )
    if parked is None:
        return None
    await conn.execute(PARK_WORKFLOW, envelope.workflow_id)
    data: dict[str, Any] = {"agent": envelope.agent, "signal": name, "seconds": delay}
    if question is not None:
        data["question"] = question
        await conn.execute(INSERT_MESSAGE, envelope.workflow_id, "agent", envelope.agent, question)
    event = EventType.WORKFLOW_WAITING if question is not None else EventType.STEP_WAITING
    await audit.record(conn, envelope.workflow_id, envelope.step_id, [(event, data)])
    return Parking(None)


async def send_signal(
    conn: Conn,
    workflow_id: UUID,
    name: str,
    payload: Any,
    *,
    transcript: tuple[str, str, str] | None = None,
) -> TaskEnvelope | None:
    """Record a signal durably; wake the step waiting for it, if one does (its envelope
    is returned to enqueue). ``transcript``: (role, author, text) to add to the session."""
    async with conn.transaction():
        await conn.execute(SIGNAL_LOCK, workflow_id)
        signal_id = await conn.fetchval(INSERT_SIGNAL, workflow_id, name, payload)
        if signal_id is None:
            status = await recovery.workflow_status(conn, workflow_id)  # raises if unknown
            raise InvalidInput(f"workflow {workflow_id} is {status.value}; it takes no signals")
        if transcript is not None:
            await conn.execute(INSERT_MESSAGE, workflow_id, *transcript)
        waiting = await conn.fetchrow(WAITING_STEP, workflow_id, name)
        await audit.record(
            conn,
            workflow_id,
            waiting["id"] if waiting else None,
            [(EventType.SIGNAL_RECEIVED, {"name": name, "woke": waiting is not None})],
        )
        if waiting is None:
            return None  # kept until a wait takes it
        await conn.execute(ASSIGN_SIGNAL, signal_id, waiting["id"], waiting["ordinal"])
        await conn.fetchval(WAKE_STEP, waiting["id"])
        await conn.execute(RESUME_WORKFLOW, workflow_id)
        row = await conn.fetchrow(recovery.SELECT_STEP_ENVELOPE, waiting["id"])
    return envelopes.of_row(row)


async def wake_due(conn: Conn, *, limit: int = 100) -> list[TaskEnvelope]:
    """Wake steps whose timer is due (a sleep's end, a wait's timeout)."""
    return [envelopes.of_row(row) for row in await conn.fetch(WAKE_DUE, limit)]
