"""The tool ledger: one row per tool call, keyed (workflow, step, call ordinal)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from orchestrator.store import Conn

# Written inside the step's completion (or failure) transaction: results of
# idempotent tools ride along with the step instead of paying their own commit.
INSERT_FINISHED = """
INSERT INTO tool_runs (idempotency_key, workflow_id, step_id, ordinal, tool, attempt,
                       status, args, result, error, finished_at)
SELECT k, $1, $2, o, t, $3, s, a::jsonb, r::jsonb, e, now()
FROM unnest($4::text[], $5::int[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
     AS x(k, o, t, s, a, r, e)
ON CONFLICT (idempotency_key) DO UPDATE
    SET status = excluded.status, result = excluded.result, error = excluded.error,
        attempt = excluded.attempt, finished_at = excluded.finished_at
    WHERE tool_runs.status <> 'succeeded'
"""
# Non-idempotent tools: the "started" row commits before the call, so a worker
# that dies mid-call leaves an in-doubt record instead of a silent re-run. Fenced:
# only the step's current execution can start a call (FOR SHARE holds off a
# concurrent takeover until this commits, so the taker sees the row).
INSERT_STARTED = """
WITH fence AS (
    SELECT id, workflow_id FROM steps
    WHERE id = $2 AND attempt = $5 AND status = 'queued' FOR SHARE
)
INSERT INTO tool_runs (idempotency_key, workflow_id, step_id, ordinal, tool, attempt,
                       status, args, deadline)
SELECT $1, workflow_id, id, $3, $4, $5, 'started', $6, now() + make_interval(secs => $7)
FROM fence
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING idempotency_key
"""
# The owner of a started call records its outcome, and only while the row is still
# its own and unsettled: a late result never overwrites what another attempt settled.
FINISH = """
UPDATE tool_runs SET status = $3, result = $4, error = $5, finished_at = now()
WHERE idempotency_key = $1 AND attempt = $2 AND status = 'started'
RETURNING idempotency_key
"""
# Another execution takes a row over: settles it (what a reconcile check found) or
# starts the call again. Fenced on the taker's attempt, and on the row being as seen.
TAKE = """
WITH fence AS (
    SELECT id FROM steps WHERE id = $2 AND attempt = $3 AND status = 'queued' FOR SHARE
)
UPDATE tool_runs t
SET attempt = $3, status = $6, result = $7, error = $8,
    started_at = CASE WHEN $6 = 'started' THEN now() ELSE t.started_at END,
    deadline = CASE WHEN $6 = 'started' THEN now() + make_interval(secs => $9)
               ELSE t.deadline END,
    finished_at = CASE WHEN $6 = 'started' THEN NULL ELSE now() END
FROM fence
WHERE t.idempotency_key = $1 AND t.attempt = $4 AND t.status = $5
RETURNING t.idempotency_key
"""
SELECT_ONE = """
SELECT idempotency_key, ordinal, tool, status, attempt, args, result, error,
       deadline IS NULL OR deadline <= now() AS lapsed
FROM tool_runs WHERE idempotency_key = $1
"""


@dataclass(frozen=True, slots=True)
class ToolRun:
    """One tool call in the ledger: its key, ordinal in the step, arguments and outcome."""

    key: str
    ordinal: int
    tool: str
    status: str  # started | succeeded | failed (certainly not applied) | in_doubt
    args: dict[str, Any]
    result: Any = None
    error: str | None = None
    attempt: int = 0  # the execution that owns (started or settled) the row
    lapsed: bool = True  # a started call's deadline has passed


def columns(runs: list[ToolRun]) -> tuple[list[Any], ...]:
    """Finished runs as the parallel arrays the unnest() inserts take (JSON as text)."""
    return (
        [r.key for r in runs],
        [r.ordinal for r in runs],
        [r.tool for r in runs],
        [r.status for r in runs],
        [json.dumps(r.args) for r in runs],
        [json.dumps(r.result) for r in runs],
        [r.error for r in runs],
    )


async def insert_finished(
    conn: Conn, workflow_id: UUID, step_id: UUID, attempt: int, runs: list[ToolRun]
) -> None:
    """Record finished calls inside the step's completion (or failure) transaction; a row
    that already succeeded is never overwritten."""
    if not runs:
        return
    await conn.execute(
        INSERT_FINISHED,
        workflow_id,
        step_id,
        attempt,
        *columns(runs),
    )


async def start(
    conn: Conn, workflow_id: UUID, step_id: UUID, attempt: int, run: ToolRun, timeout: float
) -> bool:
    """Record a non-idempotent call as started by ``attempt``; False when the key exists
    already or the attempt is fenced out (``fetch`` tells which)."""
    key = await conn.fetchval(
        INSERT_STARTED, run.key, step_id, run.ordinal, run.tool, attempt, run.args, timeout
    )
    return key is not None


async def finish(conn: Conn, run: ToolRun, attempt: int) -> bool:
    """The owner records its call's outcome; False when the row is no longer its own."""
    key = await conn.fetchval(FINISH, run.key, attempt, run.status, run.result, run.error)
    return key is not None


async def take(
    conn: Conn,
    seen: ToolRun,
    *,
    step_id: UUID,
    attempt: int,
    status: str,
    result: Any = None,
    error: str | None = None,
    timeout: float = 0.0,
) -> bool:
    """Take a row over from another execution (as ``seen``); False if it changed meanwhile
    or ``attempt`` is fenced out."""
    key = await conn.fetchval(
        TAKE, seen.key, step_id, attempt, seen.attempt, seen.status, status, result, error, timeout
    )
    return key is not None


async def fetch(conn: Conn, key: str) -> ToolRun | None:
    """The ledger row of the call ``key``, or None."""
    row = await conn.fetchrow(SELECT_ONE, key)
    if row is None:
        return None
    return ToolRun(
        key=row["idempotency_key"],
        ordinal=row["ordinal"],
        tool=row["tool"],
        status=row["status"],
        args=row["args"],
        result=row["result"],
        error=row["error"],
        attempt=row["attempt"],
        lapsed=row["lapsed"],
    )
