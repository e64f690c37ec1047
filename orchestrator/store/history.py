"""A workflow's history, read back whole (``orchestrator show``), and ids by prefix.

``story`` reads the workflow, its steps, attempts, tool runs, signals and events in
one read-only snapshot (repeatable read: the parts agree with each other) and
assembles a ``Story`` (``orchestrator.schemas.story``). ``resolve_workflow_prefix``
turns the start of an id into the whole id, by a range scan of the primary key.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from orchestrator.errors import InvalidInput, WorkflowNotFound
from orchestrator.schemas import EventType
from orchestrator.schemas.story import (
    Decision,
    ModelSpend,
    Story,
    StoryAttempt,
    StoryEvent,
    StoryRecall,
    StorySignal,
    StoryStep,
    StoryToolCall,
    StoryWait,
    StoryWorkflow,
)
from orchestrator.store import Conn

# Every id starting with a prefix lies between the prefix padded with 0s and with fs:
# a range on the primary key, never a scan of id::text.
IDS_IN_RANGE = "SELECT id FROM workflows WHERE id BETWEEN $1 AND $2 ORDER BY id LIMIT 3"
WORKFLOW = """
SELECT id, tenant_id, session_id, pipeline, status, error, state, created_at, completed_at,
       cost_usd, pruned_at IS NOT NULL AS pruned
FROM workflows WHERE id = $1
"""
STEPS = """
SELECT id, seq, agent, assigned_by, status, attempt, output, error, question, waiting_for,
       created_at, completed_at
FROM steps WHERE workflow_id = $1 ORDER BY seq
"""
ATTEMPTS = """
SELECT a.step_id, a.attempt, a.worker, a.outcome, a.error, a.started_at, a.finished_at,
       a.model, a.model_calls, a.prompt_tokens, a.completion_tokens, a.cost_usd
FROM step_attempts a JOIN steps s ON s.id = a.step_id
WHERE s.workflow_id = $1 ORDER BY s.seq, a.attempt
"""
TOOL_RUNS = """
SELECT step_id, idempotency_key, ordinal, tool, attempt, status, error
FROM tool_runs WHERE workflow_id = $1 ORDER BY step_id, ordinal
"""
SIGNALS = """
SELECT g.name, g.payload, g.created_at, g.taken_at, s.seq
FROM signals g LEFT JOIN steps s ON s.id = g.step_id
WHERE g.workflow_id = $1 ORDER BY g.id
"""
EVENTS = """
SELECT e.step_id, e.type, e.data, e.created_at, s.seq
FROM events e LEFT JOIN steps s ON s.id = e.step_id
WHERE e.workflow_id = $1 ORDER BY e.id
"""

_UUID_FORM = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_HEX = re.compile(r"[0-9a-f]+")


async def resolve_workflow_prefix(conn: Conn, prefix: str) -> UUID:
    """The id of the one workflow whose id starts with ``prefix`` (any case, dashes as in
    the id or none at all); InvalidInput when it is no id's start, or several ids'."""
    digits = prefix_digits(prefix)
    low = UUID(digits.ljust(32, "0"))
    high = UUID(digits.ljust(32, "f"))
    found = [r["id"] for r in await conn.fetch(IDS_IN_RANGE, low, high)]
    if not found:
        whole = len(digits) == 32
        raise InvalidInput(f"no workflow {prefix}" + ("" if whole else " (no id starts with it)"))
    if len(found) > 1:
        more = " and more" if len(found) > 2 else ""
        raise InvalidInput(
            f"workflow id prefix {prefix!r} is ambiguous: {found[0]}, {found[1]}{more} "
            "start with it; give more characters"
        )
    only: UUID = found[0]
    return only


def prefix_digits(prefix: str) -> str:
    """The hex digits of a workflow id prefix; InvalidInput unless it reads as the start
    of an id."""
    text = prefix.strip().lower()
    digits = text.replace("-", "")
    dashed_right = "-" not in text or all(
        _UUID_FORM[i] == "-" if c == "-" else _UUID_FORM[i] == "x"
        for i, c in enumerate(text[: len(_UUID_FORM)])
    )
    if not digits or len(digits) > 32 or not _HEX.fullmatch(digits) or not dashed_right:
        raise InvalidInput(f"not a workflow id: {prefix!r} (give an id or its first characters)")
    return digits


async def story(conn: Conn, workflow_id: UUID) -> Story:
    """The whole story of a workflow (see ``orchestrator.schemas.story``); WorkflowNotFound."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        row = await conn.fetchrow(WORKFLOW, workflow_id)
        if row is None:
            raise WorkflowNotFound(workflow_id)
        steps = await conn.fetch(STEPS, workflow_id)
        attempts = await conn.fetch(ATTEMPTS, workflow_id)
        runs = await conn.fetch(TOOL_RUNS, workflow_id)
        signals = await conn.fetch(SIGNALS, workflow_id)
        events = await conn.fetch(EVENTS, workflow_id)
    by_step: dict[UUID, list[Any]] = defaultdict(list)
    for event in events:
        by_step[event["step_id"]].append(event)
    told = [_step(s, attempts, runs, by_step[s["id"]]) for s in steps]
    done = [s for s in steps if s["status"] == "completed" and s["completed_at"] is not None]
    last = max(done, key=lambda s: s["completed_at"], default=None)
    return Story(
        workflow=_workflow(row, [a.model for s in told for a in s.attempts]),
        steps=tuple(told),
        signals=tuple(
            StorySignal(
                name=g["name"],
                payload=g["payload"],
                sent_at=g["created_at"],
                taken_at=g["taken_at"],
                taken_by_seq=g["seq"],
            )
            for g in signals
        ),
        output=None if last is None else last["output"],
        state=row["state"],
        events=tuple(
            StoryEvent(at=e["created_at"], type=e["type"], seq=e["seq"], data=e["data"])
            for e in events
        ),
    )


def _workflow(row: Any, spent: Sequence[ModelSpend]) -> StoryWorkflow:
    return StoryWorkflow(
        id=row["id"],
        tenant_id=row["tenant_id"],
        session_id=row["session_id"],
        pipeline=row["pipeline"],
        status=row["status"],
        error=row["error"],
        created_at=row["created_at"],
        completed_at=row["completed_at"],
        duration_seconds=_seconds(row["created_at"], row["completed_at"]),
        model=_summed(spent, row["cost_usd"]),
        pruned=row["pruned"],
    )


def _step(step: Any, attempts: Sequence[Any], runs: Sequence[Any], events: list[Any]) -> StoryStep:
    mine = [a for a in attempts if a["step_id"] == step["id"]]
    calls = [r for r in runs if r["step_id"] == step["id"]]
    # An erased customer's events keep their type, not their data (store.erasure).
    replays = [e for e in events if e["type"] == EventType.TOOL_REPLAYED and "attempt" in e["data"]]
    numbers = sorted(
        {a["attempt"] for a in mine}
        | {r["attempt"] for r in calls}
        | {e["data"]["attempt"] for e in replays}
    )
    rows = {a["attempt"]: a for a in mine}
    told = tuple(
        _attempt(step, n, rows.get(n), calls, replays, _decision(events, n)) for n in numbers
    )
    return StoryStep(
        seq=step["seq"],
        agent=step["agent"],
        assigned_by=step["assigned_by"],
        status=step["status"],
        attempt=step["attempt"],
        created_at=step["created_at"],
        completed_at=step["completed_at"],
        duration_seconds=_seconds(step["created_at"], step["completed_at"]),
        cost_usd=float(sum((a["cost_usd"] for a in mine), Decimal(0))),
        error=step["error"],
        waiting_for=step["waiting_for"],
        question=step["question"],
        attempts=told,
        recalls=tuple(
            StoryRecall(
                query=e["data"].get("query", ""),
                mode=e["data"].get("mode", ""),
                cached=bool(e["data"].get("cached")),
                memories=tuple(e["data"].get("memories", ())),
            )
            for e in events
            if e["type"] == EventType.MEMORY_RECALLED
        ),
        waits=tuple(_waits(events)),
    )


def _attempt(
    step: Any,
    number: int,
    row: Any | None,
    calls: Sequence[Any],
    replays: Sequence[Any],
    decision: tuple[Decision | None, float | None],
) -> StoryAttempt:
    tools = _tool_calls(number, calls, replays)
    if row is None:  # tool calls recorded, no outcome: under way, or never to finish
        running = step["status"] == "queued" and step["attempt"] == number
        return StoryAttempt(
            attempt=number,
            worker=None,
            outcome="running" if running else "lost",
            started_at=None,
            finished_at=None,
            duration_seconds=None,
            model=ModelSpend(),
            tool_calls=tuple(tools),
        )
    failed = row["outcome"] == "failed"
    return StoryAttempt(
        attempt=number,
        worker=row["worker"],
        outcome=row["outcome"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_seconds=_seconds(row["started_at"], row["finished_at"]),
        model=ModelSpend(
            model=row["model"],
            calls=row["model_calls"],
            prompt_tokens=row["prompt_tokens"],
            completion_tokens=row["completion_tokens"],
            cost_usd=float(row["cost_usd"]),
        ),
        tool_calls=tuple(tools),
        error=row["error"],
        decision=(decision[0] or "failed") if failed else None,
        retry_after_seconds=decision[1] if failed else None,
    )


def _tool_calls(number: int, calls: Sequence[Any], replays: Sequence[Any]) -> list[StoryToolCall]:
    """The calls attempt ``number`` executed (ledger rows it wrote last) or replayed."""
    tools = [
        StoryToolCall(
            key=r["idempotency_key"],
            tool=r["tool"],
            ordinal=r["ordinal"],
            how="executed",
            status=r["status"],
            error=r["error"],
        )
        for r in calls
        if r["attempt"] == number
    ] + [
        StoryToolCall(
            key=e["data"].get("key", ""),
            tool=e["data"].get("tool", ""),
            ordinal=e["data"].get("ordinal", -1),
            how="replayed",
            status="succeeded",
            recorded_attempt=e["data"].get("recorded_attempt"),
        )
        for e in replays
        if e["data"]["attempt"] == number
    ]
    tools.sort(key=lambda t: t.ordinal)
    return tools


# What the failure path decided, by the event it recorded for the failed attempt.
_DECISIONS: dict[str, Decision] = {
    EventType.STEP_RETRIED: "retried",
    EventType.STEP_FAILED: "dead-lettered",
    EventType.BRANCH_FAILED: "branch failed",
}


def _decision(events: Iterable[Any], attempt: int) -> tuple[Decision | None, float | None]:
    for e in events:
        decided = _DECISIONS.get(e["type"])
        if decided is not None and e["data"].get("attempt") == attempt:
            return decided, e["data"].get("retry_after")
    return None, None


def _waits(events: Iterable[Any]) -> list[StoryWait]:
    waits = []
    for e in events:
        data = e["data"]
        if e["type"] in (EventType.STEP_WAITING, EventType.WORKFLOW_WAITING):
            waits.append(
                StoryWait(
                    at=e["created_at"],
                    kind="parked",
                    signal=data.get("signal"),
                    seconds=data.get("seconds"),
                    question=data.get("question"),
                )
            )
        elif e["type"] == EventType.STEP_WOKEN:
            waits.append(StoryWait(at=e["created_at"], kind="woken", by=data.get("by")))
        elif e["type"] == EventType.SIGNAL_RECEIVED and data.get("woke"):
            waits.append(
                StoryWait(at=e["created_at"], kind="woken", by=f"signal {data.get('name')}")
            )
    return waits


def _summed(spent: Sequence[ModelSpend], cost_usd: Decimal) -> ModelSpend:
    """Every attempt's model use summed; the cost is the workflow's own (kept by pruning)."""
    models = sorted({m.model for m in spent if m.model})
    return ModelSpend(
        model=", ".join(models) or None,
        calls=sum(m.calls for m in spent),
        prompt_tokens=sum(m.prompt_tokens for m in spent),
        completion_tokens=sum(m.completion_tokens for m in spent),
        cost_usd=float(cost_usd),
    )


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start).total_seconds()
