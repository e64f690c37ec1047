"""Agent task streams: consumer groups, reading envelopes, and the handoff round trip."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from orchestrator.coordination.keys import Keys
from orchestrator.coordination.locks import Lock
from orchestrator.errors import InvalidInput
from orchestrator.schemas import Signal, TaskEnvelope

FIELD = b"e"
# A safety cap only: the reconciler trims acknowledged entries (trim_acknowledged).
# Trimmed-away unacknowledged entries would be rebuilt from Postgres.
STREAM_MAXLEN = 100_000
DEAD_LETTER_MAXLEN = 10_000  # the durable dead letters are rows in Postgres
LAG_SCAN = 100_000  # Redis 6.2 reports no group lag: count undelivered entries up to this
PENDING_SCAN = 10_000  # pending entries the reconciler reads (in-flight steps: few)
# KEYS[1] stream; ARGV[1] the group's last delivered id, ARGV[2] the most to count.
# Returns how many entries follow that id (counted in Redis: no entry crosses the wire).
COUNT_AFTER = """
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
"""


@dataclass(frozen=True, slots=True)
class Entry:
    """One stream entry as read: its id and raw fields (the envelope is under ``FIELD``)."""

    id: bytes
    fields: dict[FieldT, EncodableT]
    # A reclaimed entry: how long (ms) it had been idle, i.e. since its last execution's
    # last heartbeat (touch_in) or delivery: that execution's last sign of life.
    idle_ms: int | None = None


async def ensure_group(client: aioredis.Redis, keys: Keys, agent: str) -> None:
    """Create the agent's stream and consumer group (reading from the start) unless the
    group exists already."""
    try:
        await client.xgroup_create(keys.stream(agent), keys.group(agent), id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def read(
    client: aioredis.Redis, keys: Keys, agent: str, consumer: str, *, count: int, block_ms: int
) -> list[Entry]:
    """Up to ``count`` new entries for ``consumer``, waiting at most ``block_ms`` ms; they
    stay pending on it until acknowledged."""
    reply: Any = await client.xreadgroup(
        keys.group(agent), consumer, {keys.stream(agent): ">"}, count=count, block=block_ms
    )
    return [Entry(i, f) for _, entries in reply or [] for i, f in entries]


async def reclaim(
    client: aioredis.Redis,
    keys: Keys,
    agent: str,
    consumer: str,
    *,
    min_idle_ms: int,
    count: int,
    start: bytes | str = "-",
) -> tuple[bytes | str, list[Entry]]:
    """Take over entries pending longer than ``min_idle_ms`` (their worker died or hung).

    Scans the pending list from ``start`` and returns the cursor to pass next time
    ("-" once it wrapped around), so an entry behind many live ones is reached too.
    """
    pending: Any = await client.xpending_range(
        keys.stream(agent), keys.group(agent), start, "+", count, idle=min_idle_ms
    )
    idle = {p["message_id"]: int(p["time_since_delivered"]) for p in pending}
    ids = list(idle)
    cursor: bytes | str = b"(" + ids[-1] if len(ids) == count else "-"
    return cursor, await claim(client, keys, agent, consumer, idle, min_idle_ms=min_idle_ms)


async def claim(
    client: aioredis.Redis,
    keys: Keys,
    agent: str,
    consumer: str,
    ids: Sequence[bytes] | Mapping[bytes, int],
    *,
    min_idle_ms: int,
) -> list[Entry]:
    """XCLAIM ``ids`` still idle for ``min_idle_ms`` (one claimer wins each); given as a
    mapping, their idle times as XPENDING saw them go on the entries (``Entry.idle_ms``).
    Entries deleted from the stream meanwhile (trimmed, lost) are acknowledged, so they
    do not stay pending forever (Redis 6.2 keeps them); their steps are rebuilt from
    Postgres."""
    if not ids:
        return []
    idle = ids if isinstance(ids, Mapping) else {}
    stream, group = keys.stream(agent), keys.group(agent)
    claimed: Any = await client.xclaim(stream, group, consumer, min_idle_ms, list(ids))
    entries = [Entry(i, f, idle.get(i)) for i, f in claimed if i is not None and f]
    found = {e.id for e in entries}
    missing = [i for i in ids if i not in found]
    if missing:
        pipe = client.pipeline(transaction=False)
        for entry_id in missing:
            pipe.xrange(stream, entry_id, entry_id)
        exists = await pipe.execute()
        gone = [i for i, rows in zip(missing, exists, strict=True) if not rows]
        if gone:
            await client.xack(stream, group, *gone)
    return entries


async def pending_by_consumer(client: aioredis.Redis, keys: Keys, agent: str) -> dict[str, int]:
    """How many entries each consumer of the agent's group holds unacknowledged."""
    summary: Any = await client.xpending(keys.stream(agent), keys.group(agent))
    return {
        _text(c["name"]): int(c["pending"]) for c in summary.get("consumers") or [] if c["pending"]
    }


async def pending_of(
    client: aioredis.Redis, keys: Keys, agent: str, owner: str, *, count: int
) -> dict[bytes, int]:
    """Up to ``count`` entries pending on the consumer ``owner`` (to claim them when it is
    dead): their ids, with how long (ms) each has been idle."""
    rows: Any = await client.xpending_range(
        keys.stream(agent), keys.group(agent), "-", "+", count, consumername=owner
    )
    return {r["message_id"]: int(r["time_since_delivered"]) for r in rows}


async def trim_acknowledged(client: aioredis.Redis, keys: Keys, agent: str) -> None:
    """Drop entries every consumer has acknowledged: before the oldest pending one, or
    up to the last delivered one. Undelivered and pending entries are never trimmed."""
    stream, group = keys.stream(agent), keys.group(agent)
    try:
        groups: Any = await client.xinfo_groups(stream)
        summary: Any = await client.xpending(stream, group)
    except ResponseError:
        return  # no stream or group yet
    delivered = next((g["last-delivered-id"] for g in groups if _text(g["name"]) == group), None)
    if delivered is None:
        return
    if summary.get("pending"):
        minid = _text(summary["min"])
    else:
        ms, _, seq = _text(delivered).partition("-")
        minid = f"{ms}-{int(seq or 0) + 1}"
    await client.xtrim(stream, minid=minid, approximate=True)


async def delete_consumers(
    client: aioredis.Redis, keys: Keys, agent: str, is_alive: Callable[[str], Awaitable[bool]]
) -> int:
    """Remove consumers of dead workers that hold nothing (they would pile up forever)."""
    stream, group = keys.stream(agent), keys.group(agent)
    try:
        consumers: Any = await client.xinfo_consumers(stream, group)
    except ResponseError:
        return 0
    removed = 0
    for c in consumers:
        name = _text(c["name"])
        if c["pending"] == 0 and not await is_alive(name):
            await client.xgroup_delconsumer(stream, group, name)
            removed += 1
    return removed


def touch_in(pipe: Any, keys: Keys, agent: str, consumer: str, entry_id: bytes) -> None:
    """Queue an idle-time reset of an entry (XCLAIM to its own consumer): still worked on."""
    pipe.xclaim(keys.stream(agent), keys.group(agent), consumer, 0, [entry_id], justid=True)


async def undelivered_since(client: aioredis.Redis, keys: Keys, agent: str) -> int | None:
    """If the agent's group has entries not yet delivered, the time (ms, Redis clock) of the
    last one delivered: anything enqueued after it may still be waiting in the backlog.
    None when nothing waits (or the stream is gone)."""
    try:
        stream: Any = await client.xinfo_stream(keys.stream(agent))
        groups: Any = await client.xinfo_groups(keys.stream(agent))
    except ResponseError:
        return None  # no stream: nothing can be waiting in it
    delivered = next(
        (g["last-delivered-id"] for g in groups if g["name"] == keys.group(agent).encode()), None
    )
    if delivered is None or delivered == stream["last-generated-id"]:
        return None
    return int(delivered.split(b"-")[0])


async def pending_steps(
    client: aioredis.Redis, keys: Keys, agent: str, *, limit: int = PENDING_SCAN
) -> set[UUID]:
    """The steps with an entry pending (delivered, not acknowledged) in the agent's group,
    up to ``limit`` entries: each is run, or taken over from a dead or silent holder, by
    a worker. An entry Redis no longer has, or that holds no envelope, names no step."""
    stream = keys.stream(agent)
    try:
        rows: Any = await client.xpending_range(stream, keys.group(agent), "-", "+", limit)
    except ResponseError:
        return set()  # no stream or group: nothing pending
    if not rows:
        return set()
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.xrange(stream, row["message_id"], row["message_id"])
    steps: set[UUID] = set()
    for found in await pipe.execute():
        for entry_id, fields in found:
            try:
                steps.add(decode(Entry(entry_id, fields)).step_id)
            except InvalidInput:
                continue  # a poison entry: its reader dead-letters it
    return steps


async def lag(client: aioredis.Redis, stream: str, group: dict[Any, Any]) -> int:
    """Entries of ``stream`` not yet delivered to the group ``group`` (a row of XINFO
    GROUPS): Redis 7 tells; on 6.2 they are counted, up to ``LAG_SCAN``."""
    known = group.get("lag")
    if known is not None:
        return int(known)
    delivered = _text(group["last-delivered-id"])
    return int(await client.eval(COUNT_AFTER, 1, stream, delivered, LAG_SCAN))


async def backlog(
    client: aioredis.Redis, keys: Keys, agents: Sequence[str]
) -> dict[str, tuple[int, int]]:
    """(lag, pending) of each agent's consumer group, from XINFO GROUPS in one round trip:
    entries not yet delivered, and delivered but not acknowledged. A missing stream or
    group is left out. Redis 6.2 reports no lag: the entries after the last delivered one
    are counted then, up to ``LAG_SCAN``."""
    pipe = client.pipeline(transaction=False)
    for agent in agents:
        pipe.xinfo_groups(keys.stream(agent))
    replies = await pipe.execute(raise_on_error=False)
    found: dict[str, tuple[int, int]] = {}
    for agent, groups in zip(agents, replies, strict=True):
        if isinstance(groups, Exception):
            continue  # no stream yet (or Redis lost it)
        group = next((g for g in groups if _text(g["name"]) == keys.group(agent)), None)
        if group is None:
            continue
        found[agent] = (await lag(client, keys.stream(agent), group), int(group["pending"]))
    return found


def encode(envelope: TaskEnvelope) -> dict[FieldT, EncodableT]:
    """The stream fields carrying ``envelope`` (as JSON under ``FIELD``)."""
    return {FIELD: envelope.model_dump_json().encode()}


def decode(entry: Entry) -> TaskEnvelope:
    """The envelope in a stream entry; InvalidInput when it is missing or malformed."""
    raw = entry.fields.get(FIELD)
    if not isinstance(raw, bytes | str):
        fields = (", ".join(sorted(_text(f) for f in entry.fields)) or "none")[:80]
        raise InvalidInput(
            f"stream entry {_text(entry.id)} carries no task envelope "
            f"(expected field {_text(FIELD)!r}; it has: {fields})"
        )
    try:
        return TaskEnvelope.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "envelope"
        raise InvalidInput(f"malformed envelope ({where}: {first['msg']})") from exc


def _text(value: object) -> str:
    """A stream id or field name as text (redis-py hands them over as bytes)."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def enqueue(client: aioredis.Redis, keys: Keys, envelope: TaskEnvelope) -> None:
    """XADD an envelope to its agent's stream."""
    await _add(client, keys, envelope)


def enqueue_in(pipe: Any, keys: Keys, envelope: TaskEnvelope) -> None:
    """Queue the XADD of an envelope to its agent's stream on a pipeline."""
    _add(pipe, keys, envelope)


def _add(target: Any, keys: Keys, envelope: TaskEnvelope) -> Any:
    """XADD an envelope to its agent's stream (on a client, or queued on a pipeline)."""
    return target.xadd(
        keys.stream(envelope.agent), encode(envelope), maxlen=STREAM_MAXLEN, approximate=True
    )


@dataclass(frozen=True, slots=True)
class Handoff:
    """Everything Redis learns when a step ends: sent in ONE pipelined round trip."""

    done: TaskEnvelope
    entry_id: bytes
    next: Sequence[TaskEnvelope]
    signal: Signal | None
    lock: Lock | None
    retry: TaskEnvelope | None = None  # scheduled ``retry_delay`` seconds from now
    retry_delay: float = 0.0
    dead_letter: str | None = None  # the reason, when the step ran out of attempts
    # More commands for the same round trip (working memory, the consolidation queue):
    # each adds its commands to the pipeline it is given.
    extras: Sequence[Callable[[Any], None]] = ()


def hand_off_in(pipe: Any, keys: Keys, h: Handoff) -> None:
    """Queue ``h`` on ``pipe``: next envelopes, the delayed retry, the dead letter, the
    ack, the signal, the lock release. Not a transaction: Postgres holds the truth."""
    for envelope in h.next:
        _add(pipe, keys, envelope)
    if h.retry is not None:
        # The durable schedule is steps.not_before; this sorted set only speeds it up
        # (orchestrator.delayed moves due entries to their streams).
        pipe.zadd(keys.delayed(), {h.retry.model_dump_json(): time.time() + h.retry_delay})
    if h.dead_letter is not None:
        pipe.xadd(
            keys.dead_letter_stream(),
            {b"agent": h.done.agent.encode(), b"reason": h.dead_letter.encode(), **encode(h.done)},
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
    pipe.xack(keys.stream(h.done.agent), keys.group(h.done.agent), h.entry_id)
    if h.signal is not None:
        channel = keys.signal_channel() if h.signal.status.terminal else keys.progress_channel()
        pipe.publish(channel, h.signal.model_dump_json())
    for extra in h.extras:
        extra(pipe)
    if h.lock is not None:
        h.lock.release_in(pipe)


async def dead_letter(
    client: aioredis.Redis, keys: Keys, agent: str, entry: Entry, reason: str
) -> None:
    """Park an entry that cannot be processed, with its reason, then acknowledge it."""
    pipe = client.pipeline(transaction=False)
    dead_letter_in(pipe, keys, agent, entry, reason)
    pipe.xack(keys.stream(agent), keys.group(agent), entry.id)
    await pipe.execute()


def dead_letter_in(pipe: Any, keys: Keys, agent: str, entry: Entry, reason: str) -> None:
    """Add the XADD of an unprocessable ``entry`` of ``agent`` (its raw fields, the
    reason) to the dead-letter stream, in ``pipe``."""
    fields: dict[FieldT, EncodableT] = {
        b"agent": agent.encode(),
        b"entry_id": entry.id,
        b"reason": reason.encode(),
        **{f"raw.{_text(k)}": v for k, v in entry.fields.items()},
    }
    pipe.xadd(keys.dead_letter_stream(), fields, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
