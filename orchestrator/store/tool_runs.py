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
# that dies mid-call leaves an in-doubt record instead of a silent re-run.
INSERT_STARTED = """
INSERT INTO tool_runs (idempotency_key, workflow_id, step_id, ordinal, tool, attempt,
                       status, args)
VALUES ($1, $2, $3, $4, $5, $6, 'started', $7)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING idempotency_key
"""
FINISH = """
UPDATE tool_runs SET status = $2, result = $3, error = $4, finished_at = now()
WHERE idempotency_key = $1
"""
SELECT_ONE = """
SELECT idempotency_key, ordinal, tool, status, result, error
FROM tool_runs WHERE idempotency_key = $1
"""


@dataclass(frozen=True, slots=True)
class ToolRun:
    key: str
    ordinal: int
    tool: str
    status: str  # started | succeeded | failed
    args: dict[str, Any]
    result: Any = None
    error: str | None = None


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
    conn: Conn,
    workflow_id: UUID,
    step_id: UUID,
    attempt: int,
    run: ToolRun,
) -> bool:
    """Record a non-idempotent call as started; False when the key already exists."""
    key = await conn.fetchval(
        INSERT_STARTED, run.key, workflow_id, step_id, run.ordinal, run.tool, attempt, run.args
    )
    return key is not None


async def finish(conn: Conn, run: ToolRun) -> None:
    await conn.execute(FINISH, run.key, run.status, run.result, run.error)


async def fetch(conn: Conn, key: str) -> ToolRun | None:
    row = await conn.fetchrow(SELECT_ONE, key)
    if row is None:
        return None
    return ToolRun(
        key=row["idempotency_key"],
        ordinal=row["ordinal"],
        tool=row["tool"],
        status=row["status"],
        args={},
        result=row["result"],
        error=row["error"],
    )
