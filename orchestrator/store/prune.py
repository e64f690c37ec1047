"""Pruning finished workflows' history, in short batches.

For a workflow that finished (completed, failed or cancelled) longer ago than a
cutoff, its checkpoints, events, step attempts, tool runs and signals are deleted:
they serve recovery and debugging while a workflow can still move, and only grow
afterwards (a person's reply, the "input" signal, is in the transcript as well). What is kept:

- the workflow row and its steps (status, outcome, error, output): what happened;
- the dead letters: an operator's record of what could not be done;
- the messages: the session's transcript, which later tickets of it build on.

A pruned workflow gets ``pruned_at``, so it is never visited again. Each batch
claims its workflows (``FOR UPDATE SKIP LOCKED``: concurrent pruners split the
work) and deletes their rows in one short transaction of its own.

Long-term memories decay: a memory's weight is its confidence halved every half-life
since it was last used (or written), ``confidence * 0.5 ** (days / half_life)``.
``prune_memories`` deletes, in the same short batches, those whose weight fell below the
floor, and, when a retention is set, those not written (nor merged into) for longer.
A tenant's shared knowledge at full confidence (customer '', confidence 1: the seeded
past tickets, policies) is pinned: it holds no customer's data, and re-seeding it would
not bring it back (seeding never overwrites).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

from orchestrator.errors import InvalidInput
from orchestrator.store import Conn

# Served by the partial index workflows_prunable (its predicate is repeated verbatim).
CLAIM_BATCH = """
UPDATE workflows SET pruned_at = now()
WHERE id IN (SELECT id FROM workflows
             WHERE status IN ('completed', 'failed', 'cancelled') AND pruned_at IS NULL
               AND completed_at < now() - make_interval(secs => $1)
             ORDER BY completed_at
             LIMIT $2
             FOR UPDATE SKIP LOCKED)
RETURNING id
"""
# Each delete is served by an index: checkpoints', step_attempts' and events' primary keys
# (events': workflow_id, id), steps' (workflow_id, seq) and tool_runs' (step_id, ordinal).
DELETE_CHECKPOINTS = """
WITH gone AS (DELETE FROM checkpoints WHERE workflow_id = ANY($1::uuid[]) RETURNING 1)
SELECT count(*) FROM gone
"""
DELETE_EVENTS = """
WITH gone AS (DELETE FROM events WHERE workflow_id = ANY($1::uuid[]) RETURNING 1)
SELECT count(*) FROM gone
"""
DELETE_ATTEMPTS = """
WITH gone AS (
    DELETE FROM step_attempts
    WHERE step_id = ANY(ARRAY(SELECT id FROM steps WHERE workflow_id = ANY($1::uuid[])))
    RETURNING 1
)
SELECT count(*) FROM gone
"""
# Reached through the steps: tool_runs has no index on workflow_id of its own.
DELETE_TOOL_RUNS = """
WITH gone AS (
    DELETE FROM tool_runs
    WHERE step_id = ANY(ARRAY(SELECT id FROM steps WHERE workflow_id = ANY($1::uuid[])))
      AND workflow_id = ANY($1::uuid[])
    RETURNING 1
)
SELECT count(*) FROM gone
"""
# A taken signal is reached through its step (signals' (step_id, ordinal) key), one
# never taken through signals_pending (workflow_id, name, id WHERE step_id IS NULL).
DELETE_SIGNALS = """
WITH gone AS (
    DELETE FROM signals
    WHERE step_id = ANY(ARRAY(SELECT id FROM steps WHERE workflow_id = ANY($1::uuid[])))
       OR (step_id IS NULL AND workflow_id = ANY($1::uuid[]))
    RETURNING 1
)
SELECT count(*) FROM gone
"""

# The sweep reads every tenant's memories: row-level security lets a transaction that set
# orchestrator.sweep see them (migration V9), and only this module sets it.
SWEEP_MEMORIES = "SELECT set_config('orchestrator.sweep', 'memories', true)"
# weight < floor, solved for the age so nothing underflows (power() raises on underflow):
# confidence * 2^(-days / half_life) < floor  <=>  days * ln 2 / half_life > ln(confidence /
# floor). A floor of 0 prunes nothing by decay; $3 NULL: no retention.
DELETE_MEMORIES = """
WITH gone AS (
    DELETE FROM memories
    WHERE id IN (
        SELECT id FROM memories
        WHERE NOT (customer_id = '' AND confidence >= 1)
          AND (($2::float8 > 0 AND CASE
                   WHEN confidence < $2 THEN true
                   ELSE extract(epoch FROM now() - coalesce(last_used_at, updated_at))
                        / 86400 / $1 * ln(2) > ln(confidence / $2)
               END)
               OR updated_at < now() - make_interval(secs => $3))
        LIMIT $4
    )
    RETURNING 1
)
SELECT count(*) FROM gone
"""


@dataclass(frozen=True, slots=True)
class PruneReport:
    """How many workflows were pruned and how many of their rows were deleted; how many
    memories decayed or outlived the retention."""

    workflows: int = 0
    checkpoints: int = 0
    events: int = 0
    attempts: int = 0
    tool_runs: int = 0
    memories: int = 0
    signals: int = 0

    def __add__(self, other: PruneReport) -> PruneReport:
        return PruneReport(
            self.workflows + other.workflows,
            self.checkpoints + other.checkpoints,
            self.events + other.events,
            self.attempts + other.attempts,
            self.tool_runs + other.tool_runs,
            self.memories + other.memories,
            self.signals + other.signals,
        )


async def prune_finished(
    conn: Conn,
    *,
    older_than_seconds: float,
    batch: int = 500,
    on_batch: Callable[[PruneReport], None] | None = None,
) -> PruneReport:
    """Delete the history of workflows finished more than ``older_than_seconds`` ago.

    Runs batch after batch (each its own transaction) until one comes back short;
    ``on_batch`` sees the running total after each.
    """
    if older_than_seconds < 0 or batch < 1:
        raise InvalidInput("prune needs older_than_seconds >= 0 and batch >= 1")
    total = PruneReport()
    while True:
        report = await _prune_batch(conn, older_than_seconds, batch)
        total += report
        if on_batch is not None:
            on_batch(total)
        if report.workflows < batch:
            return total


async def _prune_batch(conn: Conn, older_than_seconds: float, batch: int) -> PruneReport:
    async with conn.transaction():
        ids: list[UUID] = [
            r["id"] for r in await conn.fetch(CLAIM_BATCH, older_than_seconds, batch)
        ]
        if not ids:
            return PruneReport()
        return PruneReport(
            workflows=len(ids),
            checkpoints=await conn.fetchval(DELETE_CHECKPOINTS, ids),
            events=await conn.fetchval(DELETE_EVENTS, ids),
            attempts=await conn.fetchval(DELETE_ATTEMPTS, ids),
            tool_runs=await conn.fetchval(DELETE_TOOL_RUNS, ids),
            signals=await conn.fetchval(DELETE_SIGNALS, ids),
        )


async def prune_memories(
    conn: Conn,
    *,
    half_life_days: float,
    prune_below: float,
    retention_days: float | None = None,
    batch: int = 500,
) -> PruneReport:
    """Delete every tenant's memories whose decayed weight is below ``prune_below``, or not
    written for ``retention_days`` (when set); the pinned shared knowledge stays (see the
    module docstring). Batch after batch, each its own transaction, until one comes back
    short."""
    if half_life_days <= 0 or not 0 <= prune_below <= 1 or batch < 1:
        raise InvalidInput(
            "prune_memories needs half_life_days > 0, 0 <= prune_below <= 1 and batch >= 1"
        )
    if retention_days is not None and retention_days <= 0:
        raise InvalidInput("prune_memories needs retention_days > 0 (or None: kept)")
    retention = None if retention_days is None else retention_days * 86400
    total = 0
    while True:
        async with conn.transaction():
            await conn.execute(SWEEP_MEMORIES)
            gone: int = await conn.fetchval(
                DELETE_MEMORIES, half_life_days, prune_below, retention, batch
            )
        total += gone
        if gone < batch:
            return PruneReport(memories=total)
