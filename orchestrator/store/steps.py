"""The step protocol in Postgres: open check, fenced completion, fenced failure, requeue.

The claim is folded into the completion (DESIGN.md, "Cost"): a worker reads
the step once (no commit), runs it under a Redis lock, and completes it in ONE
transaction that only lands while the step is still queued at the attempt the
worker started with. The first fenced completion wins; any other is rejected.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from orchestrator.errors import FenceRejected, Parked
from orchestrator.schemas import EventType, StepStatus, TaskEnvelope, WorkflowStatus
from orchestrator.store import (
    Conn,
    branches,
    dead_letters,
    envelopes,
    ids,
    recovery,
    tool_runs,
    waits,
)
from orchestrator.store import events as audit
from orchestrator.store.tool_runs import ToolRun

SELECT_OPEN = """
SELECT s.id, s.status, s.attempt, s.failures, s.waits, w.status AS workflow_status,
       w.tenant_id, w.session_id,
       (SELECT e.customer_id FROM sessions e WHERE e.id = w.session_id) AS customer_id,
       coalesce((SELECT jsonb_agg(jsonb_build_array(g.ordinal, g.name, g.payload))
                 FROM signals g WHERE g.step_id = s.id), '[]'::jsonb) AS signals,
       w.next_seq, w.open_steps = 1 AND w.join_step IS NULL AS alone,
       coalesce((SELECT jsonb_agg(jsonb_build_array(t.idempotency_key, t.ordinal, t.tool,
                                                    t.status, t.args, t.result, t.error,
                                                    t.attempt))
                 FROM tool_runs t WHERE t.step_id = s.id), '[]'::jsonb) AS runs,
       b.usd AS budget_usd, b.spent_usd AS budget_spent_usd
FROM steps s JOIN workflows w ON w.id = s.workflow_id
     LEFT JOIN tenant_budgets b ON b.tenant_id = w.tenant_id
WHERE s.id = $1
"""
# Taking over a step whose last execution died or stalled: a new fence (attempt), so
# the old execution, if it still runs somewhere, can write nothing more. Only for a
# step still open, in a running workflow, and due (a scheduled retry waits its turn).
TAKE_OVER = """
WITH bumped AS (
    UPDATE steps s SET attempt = s.attempt + 1, updated_at = now()
    FROM workflows w
    WHERE s.id = $1 AND s.status = 'queued' AND w.id = s.workflow_id AND w.status = 'running'
      AND (s.not_before IS NULL OR s.not_before <= now())
    RETURNING s.id, s.workflow_id, s.attempt
), event_row AS (
    INSERT INTO events (workflow_id, step_id, type, data)
    SELECT workflow_id, id, 'step.taken_over',
           jsonb_build_object('attempt', attempt, 'by', $2::text)
    FROM bumped
)
SELECT attempt FROM bumped
"""
# The fence: only a queued step at the worker's attempt can be closed. A failure
# counts against the retry budget (failures), apart from the fence.
CLOSE_STEP = """
UPDATE steps SET status = $3, output = $4, error = $5, completed_at = now(), updated_at = now(),
                 failures = failures + 1
WHERE id = $1 AND attempt = $2 AND status = 'queued'
RETURNING id
"""
RETRY_STEP = """
UPDATE steps SET attempt = attempt + 1, failures = failures + 1, error = $3, updated_at = now(),
                 not_before = now() + make_interval(secs => $4)
WHERE id = $1 AND attempt = $2 AND status = 'queued'
RETURNING attempt
"""
# The whole completion as ONE statement (one round trip, atomic by itself): every
# write hangs off the fenced UPDATE, so a rejected fence writes nothing at all.
COMPLETE_STEP = """
WITH closed AS (
    UPDATE steps SET status = 'completed', output = $3, completed_at = now(), updated_at = now()
    WHERE id = $1 AND attempt = $2 AND status = 'queued'
    RETURNING id, workflow_id
), attempt_row AS (
    INSERT INTO step_attempts (step_id, attempt, worker, outcome, started_at, model,
                               model_calls, prompt_tokens, completion_tokens, cost_usd)
    SELECT id, $2, $4, 'completed', $5, $23, $24, $25, $26, $27 FROM closed
), run_rows AS (
    INSERT INTO tool_runs (idempotency_key, workflow_id, step_id, ordinal, tool, attempt,
                           status, args, result, error, finished_at)
    SELECT k, c.workflow_id, c.id, o, t, $2, st, a::jsonb, r::jsonb, e, now()
    FROM closed c,
         unnest($6::text[], $7::int[], $8::text[], $9::text[], $10::text[], $11::text[],
                $12::text[]) AS x(k, o, t, st, a, r, e)
    ON CONFLICT (idempotency_key) DO UPDATE
        SET status = excluded.status, result = excluded.result, error = excluded.error,
            attempt = excluded.attempt, finished_at = excluded.finished_at
        WHERE tool_runs.status <> 'succeeded'
), checkpoint_row AS (
    -- What the step changed in the state ($31), not the whole state again (V13).
    INSERT INTO checkpoints (workflow_id, seq, agent, state)
    SELECT workflow_id, $13, $14, $31 FROM closed
), transcript AS (
    INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content)
    SELECT w.session_id, w.tenant_id, w.id, 'agent', $14, m
    FROM closed c JOIN workflows w ON w.id = c.workflow_id, unnest($19::text[]) AS m
), workflow_row AS (
    -- Only for a step alone in its workflow ($29); branches settle under the row lock
    -- in the same transaction (store.branches).
    UPDATE workflows
    SET state = $15, status = $20::text, updated_at = now(), next_seq = $28,
        open_steps = cardinality($16::uuid[]),
        completed_at = CASE WHEN $20::text = 'running' THEN NULL ELSE now() END,
        cost_usd = cost_usd + $27
    WHERE id = (SELECT workflow_id FROM closed) AND status = 'running' AND $29::bool
    RETURNING id, session_id, status
), next_steps AS (
    -- No input: the next step starts from the workflow's state, which workflow_row sets
    -- to $15 (migration V13). Hanging off that update, a step is created only with it.
    INSERT INTO steps (id, workflow_id, seq, agent, assigned_by, status, traceparent)
    SELECT i, wr.id, q, a, $14, 'queued', $30
    FROM workflow_row wr, unnest($16::uuid[], $17::int[], $18::text[]) AS x(i, q, a)
    WHERE wr.status = 'running'
    RETURNING id
), workflow_cost AS (
    -- The cost, when workflow_row leaves the row alone (a branch, a cancelled workflow):
    -- the conditions exclude each other, so the row is updated once by this statement.
    UPDATE workflows SET cost_usd = cost_usd + $27
    WHERE id = (SELECT workflow_id FROM closed) AND $27 > 0
      AND NOT (status = 'running' AND $29::bool)
), budget_row AS (
    -- Only a tenant with a budget keeps a running spend (no row, no write).
    UPDATE tenant_budgets b SET spent_usd = b.spent_usd + $27, updated_at = now()
    FROM closed c JOIN workflows w ON w.id = c.workflow_id
    WHERE b.tenant_id = w.tenant_id AND $27 > 0
), event_rows AS (
    INSERT INTO events (workflow_id, step_id, type, data)
    SELECT c.workflow_id, c.id, t, d::jsonb
    FROM closed c, unnest($21::text[], $22::text[]) AS x(t, d)
)
SELECT (SELECT count(*) FROM closed) AS closed, (SELECT count(*) FROM next_steps) AS handed,
       (SELECT status FROM workflow_row) AS workflow_status,
       -- The session by key first: as a semi join, the planner at times read the whole
       -- session queue index per completion (benchmarks/explain.py: 1,912 buffers, not 88).
       (SELECT q.session_id FROM workflows q
        WHERE q.session_id = (SELECT wr.session_id FROM workflow_row wr
                              WHERE wr.status <> 'running')
          AND q.status = 'queued'
        LIMIT 1) AS session_with_queue
"""
# A failed or parked attempt, and its cost added to the workflow (and to the tenant's
# spend, when it has a budget): one statement of the failure's or parking's transaction.
INSERT_ATTEMPT = """
WITH attempt_row AS (
    INSERT INTO step_attempts (step_id, attempt, worker, outcome, error, started_at, model,
                               model_calls, prompt_tokens, completion_tokens, cost_usd)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
), workflow_cost AS (
    UPDATE workflows SET cost_usd = cost_usd + $11 WHERE id = $12 AND $11 > 0
    RETURNING tenant_id
)
UPDATE tenant_budgets b SET spent_usd = b.spent_usd + $11, updated_at = now()
FROM workflow_cost c WHERE b.tenant_id = c.tenant_id
"""
UPDATE_WORKFLOW = """
UPDATE workflows
SET state = state || $2, status = $3, error = $4, updated_at = now(),
    completed_at = CASE WHEN $3 = 'running' THEN NULL ELSE now() END
WHERE id = $1 AND status = 'running'
"""
INSERT_MESSAGES = """
INSERT INTO messages (session_id, tenant_id, workflow_id, role, author, content)
SELECT w.session_id, w.tenant_id, w.id, 'agent', $2, c
FROM workflows w, unnest($3::text[]) AS c WHERE w.id = $1
"""


@dataclass(frozen=True, slots=True)
class OpenStep:
    """What a worker learns about a step before running it (one read, no commit)."""

    runnable: bool
    reason: str  # why not runnable: "completed", "stale attempt", "workflow cancelled", ...
    recorded: dict[int, ToolRun] = field(default_factory=dict)
    # The durable waits of earlier runs: due times by ordinal, signals taken by ordinal.
    waits: list[float | None] = field(default_factory=list)
    signals: dict[int, tuple[str, Any]] = field(default_factory=dict)
    failures: int = 0  # real failures so far: the retry budget, apart from the fence
    next_seq: int = 1  # the workflow's next step number (as read: exact while alone)
    alone: bool = True  # the only open step of its workflow, no join pending: no branches
    # Whose step it is, from the workflow row (never from the envelope): what
    # row-level security and the Redis key namespace scope the step's memory to.
    tenant_id: str = ""
    session_id: str = ""
    customer_id: str = ""
    # The tenant's model budget (USD) and its spend when the step opened; None: no budget.
    budget_usd: Decimal | None = None
    budget_spent_usd: Decimal = Decimal(0)


@dataclass(frozen=True, slots=True)
class ModelUse:
    """The model a step attempt used and what it spent (recorded with the attempt)."""

    model: str | None = None
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    def row(self) -> tuple[str | None, int, int, int, Decimal]:
        """The attempt row's values: model (None when no call was made), calls, prompt
        and completion tokens, cost in USD."""
        return (
            self.model if self.calls else None,
            self.calls,
            self.prompt_tokens,
            self.completion_tokens,
            self.cost_usd,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the agent produced, ready to be committed in one transaction."""

    output: dict[str, Any]
    state: dict[str, Any]
    next_agents: tuple[str, ...]
    tool_runs: list[ToolRun]
    messages: list[str]
    worker: str
    started_at: datetime
    usage: ModelUse = ModelUse()
    traceparent: str | None = None  # the step's span, parent of the next steps' spans
    # More events committed with the step (type, data): what it did with memory, the
    # recorded tool results it replayed.
    events: tuple[tuple[str, dict[str, Any]], ...] = ()
    # What the step changed in the state (its checkpoint: the whole state is the workflow
    # row's, and earlier ones fold from these); None: the whole state is checkpointed.
    changes: dict[str, Any] | None = None


async def open_steps(conn: Conn, envelopes: Sequence[TaskEnvelope]) -> list[OpenStep]:
    """What the worker needs to run each step, read in one pipelined round trip; not
    ``runnable`` (with the reason) when the step is unknown or closed, its workflow is not
    running, or the attempt is stale."""
    rows = await conn.fetchmany(SELECT_OPEN, [(e.step_id,) for e in envelopes])
    found = {row["id"]: row for row in rows}
    return [_opened(found.get(e.step_id), e) for e in envelopes]


def _opened(row: Any, envelope: TaskEnvelope) -> OpenStep:
    if row is None:
        return OpenStep(False, "unknown step")
    if row["workflow_status"] != WorkflowStatus.RUNNING:
        return OpenStep(False, f"workflow {row['workflow_status']}")
    if row["status"] != StepStatus.QUEUED:
        return OpenStep(False, f"step {row['status']}")
    if row["attempt"] != envelope.attempt:
        return OpenStep(False, f"stale attempt {envelope.attempt} (step at {row['attempt']})")
    recorded = {
        r[1]: ToolRun(
            key=r[0],
            ordinal=r[1],
            tool=r[2],
            status=r[3],
            args=r[4],
            result=r[5],
            error=r[6],
            attempt=r[7],
        )
        for r in row["runs"]
    }
    return OpenStep(
        True,
        "",
        recorded,
        waits=list(row["waits"]),
        signals={s[0]: (s[1], s[2]) for s in row["signals"]},
        failures=row["failures"],
        next_seq=row["next_seq"],
        alone=row["alone"],
        tenant_id=row["tenant_id"],
        session_id=row["session_id"],
        customer_id=row["customer_id"] or "",
        budget_usd=row["budget_usd"],
        budget_spent_usd=row["budget_spent_usd"] or Decimal(0),
    )


def _opened_after(opened: OpenStep, handed: int) -> OpenStep:
    """The open read of the step a linear completion of ``opened``'s step creates, as
    ``SELECT_OPEN`` returns it once that commits: queued at attempt 1 with nothing recorded,
    the workflow's next number moved on by the ``handed`` steps (one)."""
    return replace(
        opened, recorded={}, waits=[], signals={}, failures=0, next_seq=opened.next_seq + handed
    )


async def take_over(conn: Conn, envelope: TaskEnvelope, by: str) -> TaskEnvelope | None:
    """A new fence for a redelivered step (its last execution died or stalled); None when
    the step is closed, its workflow not running, or a scheduled retry is not due."""
    attempt = await conn.fetchval(TAKE_OVER, envelope.step_id, by)
    return None if attempt is None else envelope.model_copy(update={"attempt": attempt})


def _next_envelopes(envelope: TaskEnvelope, outcome: Outcome, next_seq: int) -> list[TaskEnvelope]:
    return [
        envelopes.next_step(
            envelope,
            step_id=ids.time_ordered(),
            seq=next_seq + i,
            agent=agent,
            state=outcome.state,
            traceparent=outcome.traceparent,
        )
        for i, agent in enumerate(outcome.next_agents)
    ]


@dataclass(frozen=True, slots=True)
class Linear:
    """A completion that is ONE statement (``COMPLETE_STEP``): its arguments, ready to be
    sent alone or pipelined with others (``complete_linear``), and the next steps."""

    envelope: TaskEnvelope
    next: list[TaskEnvelope]
    args: tuple[Any, ...]
    # The next step's open read once this commits (``store.read_ahead``); None: read it.
    ready: OpenStep | None = None


def linear(
    envelope: TaskEnvelope,
    outcome: Outcome,
    opened: OpenStep,
    joins: frozenset[str] = frozenset(),
) -> Linear | None:
    """The one-statement completion of a step alone in its workflow handing to at most
    one non-join agent (the common case); None for forks, branches and joins."""
    if not (
        opened.alone
        and len(outcome.next_agents) <= 1
        and not any(a in joins for a in outcome.next_agents)
    ):
        return None
    nxt = _next_envelopes(envelope, outcome, opened.next_seq)
    args = _close_args(envelope, outcome, opened, nxt, done=not nxt, linear=True)
    # A tenant with a budget reads its spend afresh each step: other workflows move it.
    ahead = nxt and opened.budget_usd is None
    return Linear(envelope, nxt, args, _opened_after(opened, len(nxt)) if ahead else None)


async def complete_linear(conn: Conn, items: Sequence[Linear]) -> list[Any]:
    """Send the completions in one pipelined round trip, as ONE transaction (one commit):
    a row per item, in order. Each is fenced on its own; a rejected one writes nothing."""
    return list(await conn.fetchmany(COMPLETE_STEP, [i.args for i in items]))


def linear_result(item: Linear, row: Any) -> tuple[Completed, str | None]:
    """What a linear completion committed, and the session whose next ticket may start
    (None, mostly); raise FenceRejected if it lost."""
    if row is None or not row["closed"]:
        raise _rejected("completion", item.envelope)
    # Next steps are only created while the workflow runs (not after a cancel meanwhile,
    # which left the workflow row untouched).
    status = WorkflowStatus(row["workflow_status"] or WorkflowStatus.CANCELLED)
    handed = item.next if row["handed"] == len(item.next) else []
    return Completed(handed, status), row["session_with_queue"]


async def complete(
    conn: Conn,
    envelope: TaskEnvelope,
    outcome: Outcome,
    opened: OpenStep,
    joins: frozenset[str] = frozenset(),
) -> Completed:
    """Close the step and hand off; raise FenceRejected if it lost.

    A step alone in its workflow handing to at most one non-join agent (the common
    case) completes in ONE statement (``linear``). Forks, branches and joins settle in
    the same transaction under the workflow row's lock (``store.branches``).
    """
    one = linear(envelope, outcome, opened, joins)
    if one is None:
        async with conn.transaction():
            args = _close_args(envelope, outcome, opened, [], done=False, linear=False)
            row = await conn.fetchrow(COMPLETE_STEP, *args)
            if row is None or not row["closed"]:
                raise _rejected("completion", envelope)
            settled = await branches.settle(
                conn,
                envelope,
                state=outcome.state,
                next_agents=outcome.next_agents,
                joins=joins,
                traceparent=outcome.traceparent,
            )
            return Completed(settled.next, settled.status)
    completed, session = linear_result(one, (await complete_linear(conn, [one]))[0])
    return await promote_after(conn, completed, session)


async def promote_after(conn: Conn, completed: Completed, session: str | None) -> Completed:
    """The workflow finished and tickets wait behind it in ``session``: start the next."""
    if session is None:
        return completed
    return Completed(completed.next + await recovery.promote_next(conn, session), completed.status)


def _close_args(
    envelope: TaskEnvelope,
    outcome: Outcome,
    opened: OpenStep,
    nxt: list[TaskEnvelope],
    *,
    done: bool,
    linear: bool,
) -> tuple[Any, ...]:
    events: list[tuple[str, dict[str, Any]]] = [
        (EventType.STEP_COMPLETED, {"agent": envelope.agent, "attempt": envelope.attempt}),
        *outcome.events,
    ]
    if done:
        events.append((EventType.WORKFLOW_COMPLETED, {}))
    return (
        envelope.step_id,
        envelope.attempt,
        outcome.output,
        outcome.worker,
        outcome.started_at,
        *tool_runs.columns(outcome.tool_runs),
        envelope.seq,
        envelope.agent,
        outcome.state,
        [e.step_id for e in nxt],
        [e.seq for e in nxt],
        [e.agent for e in nxt],
        outcome.messages,
        (WorkflowStatus.COMPLETED if done else WorkflowStatus.RUNNING).value,
        [str(t) for t, _ in events],
        [json.dumps(d) for _, d in events],
        *outcome.usage.row(),
        opened.next_seq + len(nxt),
        linear,
        outcome.traceparent or envelope.traceparent,  # what the next steps' spans start under
        outcome.state if outcome.changes is None else outcome.changes,
    )


@dataclass(frozen=True, slots=True)
class Completed:
    """What a completion committed: envelopes to enqueue, and the workflow's new status."""

    next: list[TaskEnvelope]
    status: WorkflowStatus


@dataclass(frozen=True, slots=True)
class Failure:
    """What the failure path committed: a retry to schedule, or a dead letter."""

    retry: TaskEnvelope | None
    delay: float
    # To enqueue: next in the session, or, after a tolerated branch failure, the join.
    promoted: list[TaskEnvelope] = field(default_factory=list)
    workflow_failed: bool = True  # False: only a branch ended (its join tolerates it)
    status: WorkflowStatus = WorkflowStatus.FAILED


async def fail(
    conn: Conn,
    envelope: TaskEnvelope,
    *,
    error: str,
    retry_after: float | None,
    recorded: list[ToolRun],
    worker: str,
    started_at: datetime,
    usage: ModelUse | None = None,
    optional_join: str | None = None,
    events: Sequence[tuple[str, dict[str, Any]]] = (),
) -> Failure:
    """Record a failed attempt (keeping its tool results) in one transaction.

    With ``retry_after`` the step stays open with the next attempt and a durable
    not-before time; without it the step and workflow fail and a dead letter is kept.
    """
    usage = usage or ModelUse()
    async with conn.transaction():
        if retry_after is not None:
            new_attempt = await conn.fetchval(
                RETRY_STEP, envelope.step_id, envelope.attempt, error, retry_after
            )
            closed = new_attempt is not None
        else:
            closed = (
                await conn.fetchval(
                    CLOSE_STEP,
                    envelope.step_id,
                    envelope.attempt,
                    StepStatus.FAILED.value,
                    None,
                    error,
                )
                is not None
            )
        if not closed:
            raise _rejected("failure", envelope)
        await _record_attempt(conn, envelope, "failed", error, worker, started_at, usage, recorded)
        data = {"agent": envelope.agent, "attempt": envelope.attempt, "error": error}
        done = [(EventType(t), d) for t, d in events]  # what the run did (tools replayed)
        if retry_after is not None:
            await _events(
                conn,
                envelope,
                [*done, (EventType.STEP_RETRIED, {**data, "retry_after": retry_after})],
            )
            return Failure(envelope.model_copy(update={"attempt": new_attempt}), retry_after)
        ended = await branches.fail_branch(conn, envelope, error=error, join=optional_join)
        if ended is not None:  # one branch of several: the others (and the join) go on
            await _events(conn, envelope, [*done, (EventType.BRANCH_FAILED, data)])
            return Failure(None, 0.0, ended.next, workflow_failed=False, status=ended.status)
        await conn.execute(
            UPDATE_WORKFLOW,
            envelope.workflow_id,
            envelope.payload,
            WorkflowStatus.FAILED.value,
            f"{envelope.agent}: {error}",
        )
        letter = await dead_letters.add(
            conn,
            agent=envelope.agent,
            reason=error,
            envelope=envelope.model_dump_json(),
            workflow_id=envelope.workflow_id,
            step_id=envelope.step_id,
        )
        await _events(
            conn,
            envelope,
            [
                *done,
                (EventType.STEP_FAILED, data),
                (EventType.STEP_DEAD_LETTERED, {"id": letter}),
                (EventType.WORKFLOW_FAILED, {"error": error}),
            ],
        )
        promoted = await recovery.promote_after(conn, envelope.workflow_id)
    return Failure(None, 0.0, promoted)


async def park(
    conn: Conn,
    envelope: TaskEnvelope,
    parked: Parked,
    *,
    ordinal: int,
    recorded: list[ToolRun],
    worker: str,
    started_at: datetime,
    usage: ModelUse,
) -> waits.Parking:
    """Park the step on a signal or timer (tool results are kept), or, when the signal
    is already there, re-run it at once; FenceRejected when the fence moved."""
    async with conn.transaction():
        parking = await waits.park(
            conn,
            envelope,
            name=parked.name,
            delay=parked.delay,
            due=parked.due,
            new=parked.new,
            ordinal=ordinal,
            question=parked.question,
        )
        if parking is None:
            raise _rejected("parking", envelope)
        await _record_attempt(conn, envelope, "waiting", None, worker, started_at, usage, recorded)
    return parking


def _rejected(what: str, envelope: TaskEnvelope) -> FenceRejected:
    return FenceRejected(
        f"{what} of attempt {envelope.attempt} rejected: step is closed or re-enqueued",
        workflow_id=envelope.workflow_id,
        step_id=envelope.step_id,
        agent=envelope.agent,
    )


async def _record_attempt(
    conn: Conn,
    envelope: TaskEnvelope,
    outcome: str,
    error: str | None,
    worker: str,
    started_at: datetime,
    usage: ModelUse,
    recorded: list[ToolRun],
) -> None:
    """The attempt row and the tool results it produced (reused by the next attempt)."""
    await conn.execute(
        INSERT_ATTEMPT,
        envelope.step_id,
        envelope.attempt,
        worker,
        outcome,
        error,
        started_at,
        *usage.row(),
        envelope.workflow_id,
    )
    await tool_runs.insert_finished(
        conn, envelope.workflow_id, envelope.step_id, envelope.attempt, recorded
    )


async def _events(
    conn: Conn,
    envelope: TaskEnvelope,
    events: list[tuple[EventType, dict[str, Any]]],
) -> None:
    await audit.record(conn, envelope.workflow_id, envelope.step_id, events)
