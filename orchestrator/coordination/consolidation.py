"""The consolidation queue: completed workflows to distil into long-term memory.

One Redis stream (``Keys.consolidation_stream``) read by the consumer group
``consolidation``. An entry is only a nudge: Postgres keeps every completed,
not yet consolidated workflow (``workflows.consolidated_at IS NULL``), so a lost
entry is re-added from there (``engine.consolidator.requeue_unconsolidated``)
and a duplicate one finds the workflow consolidated already. Entries are
acknowledged and deleted once their consolidation committed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orchestrator.coordination import streams
from orchestrator.coordination.keys import Keys
from orchestrator.coordination.streams import Entry
from orchestrator.errors import InvalidInput

GROUP = "consolidation"
AGENT = "consolidation"  # how the dead letters of this queue name their source
SCHEMA_VERSION = b"1"
VERSION_FIELD = b"v"
WORKFLOW_FIELD = b"w"
# A safety cap only (acknowledged entries are deleted): whatever it trims is re-added
# from Postgres.
STREAM_MAXLEN = 1_000_000


def _fields(workflow_id: UUID) -> dict[Any, Any]:
    return {VERSION_FIELD: SCHEMA_VERSION, WORKFLOW_FIELD: str(workflow_id).encode()}


def enqueue_in(pipe: Any, keys: Keys, workflow_id: UUID) -> None:
    """Add the workflow to the consolidation stream, in the handoff's pipeline."""
    pipe.xadd(
        keys.consolidation_stream(), _fields(workflow_id), maxlen=STREAM_MAXLEN, approximate=True
    )


async def enqueue(client: aioredis.Redis, keys: Keys, workflow_ids: Sequence[UUID]) -> None:
    """Add workflows to the consolidation stream, in one round trip."""
    if not workflow_ids:
        return
    pipe = client.pipeline(transaction=False)
    for workflow_id in workflow_ids:
        enqueue_in(pipe, keys, workflow_id)
    await pipe.execute()


def decode(entry: Entry) -> UUID:
    """The workflow id an entry carries; InvalidInput when the entry is malformed or of
    a schema version this code does not read."""
    version = entry.fields.get(VERSION_FIELD)
    if version != SCHEMA_VERSION:
        raise InvalidInput(f"consolidation entry {entry.id!r} has schema version {version!r}")
    raw = entry.fields.get(WORKFLOW_FIELD)
    try:
        return UUID(raw.decode() if isinstance(raw, bytes) else str(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"consolidation entry {entry.id!r}: no workflow id ({raw!r})") from exc


async def ensure_group(client: aioredis.Redis, keys: Keys) -> None:
    """Create the stream and the ``consolidation`` group (reading from the start) unless
    the group exists already."""
    try:
        await client.xgroup_create(keys.consolidation_stream(), GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def read(
    client: aioredis.Redis, keys: Keys, consumer: str, *, count: int, block_ms: int
) -> list[Entry]:
    """Up to ``count`` new entries for ``consumer``, waiting at most ``block_ms`` ms; they
    stay pending on it until ``done``."""
    reply: Any = await client.xreadgroup(
        GROUP, consumer, {keys.consolidation_stream(): ">"}, count=count, block=block_ms
    )
    return [Entry(i, f) for _, entries in reply or [] for i, f in entries]


async def reclaim(
    client: aioredis.Redis,
    keys: Keys,
    consumer: str,
    *,
    min_idle_ms: int,
    count: int,
    start: bytes | str = "0-0",
) -> tuple[bytes | str, list[Entry]]:
    """XAUTOCLAIM entries pending longer than ``min_idle_ms`` (their consolidator died or
    hung); returns the cursor for the next call and the entries.

    Redis 6.2 answers an entry deleted while pending (trimmed) with no id: those are
    found through XPENDING and acknowledged, so they do not come back forever.
    """
    stream = keys.consolidation_stream()
    reply: Any = await client.xautoclaim(
        stream, GROUP, consumer, min_idle_ms, start_id=start, count=count
    )
    cursor, claimed = reply[0], reply[1]
    entries = [Entry(i, f) for i, f in claimed if i is not None and f]
    if len(entries) < len(claimed):
        await _ack_deleted(client, stream, min_idle_ms, count)
    return cursor, entries


async def _ack_deleted(client: aioredis.Redis, stream: str, min_idle_ms: int, count: int) -> None:
    pending: Any = await client.xpending_range(stream, GROUP, "-", "+", count, idle=min_idle_ms)
    ids = [p["message_id"] for p in pending]
    pipe = client.pipeline(transaction=False)
    for entry_id in ids:
        pipe.xrange(stream, entry_id, entry_id)
    found = await pipe.execute()
    gone = [i for i, rows in zip(ids, found, strict=True) if not rows]
    if gone:
        await client.xack(stream, GROUP, *gone)


async def done(
    client: aioredis.Redis,
    keys: Keys,
    entry_ids: Sequence[bytes],
    also: Sequence[Callable[[Any], None]] = (),
) -> None:
    """Acknowledge and delete entries whose consolidation committed (or was not needed);
    ``also`` adds more commands to the same round trip."""
    if not entry_ids and not also:
        return
    stream = keys.consolidation_stream()
    pipe = client.pipeline(transaction=False)
    if entry_ids:
        pipe.xack(stream, GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
    for extra in also:
        extra(pipe)
    await pipe.execute()


async def dead_letter(client: aioredis.Redis, keys: Keys, entry: Entry, reason: str) -> None:
    """Park an entry that cannot be consolidated on the dead-letter stream, with its
    reason, then acknowledge and delete it."""
    stream = keys.consolidation_stream()
    pipe = client.pipeline(transaction=False)
    streams.dead_letter_in(pipe, keys, AGENT, entry, reason)
    pipe.xack(stream, GROUP, entry.id)
    pipe.xdel(stream, entry.id)
    await pipe.execute()


@dataclass(frozen=True, slots=True)
class QueueState:
    """The stream as Redis has it: whether the group exists, entries not yet delivered,
    entries delivered but not acknowledged, the time (ms, Redis clock) of the last
    delivered entry (None: none yet) and Redis's clock now (ms)."""

    exists: bool
    undelivered: int
    pending: int
    last_delivered_ms: int | None
    now_ms: int


async def state(client: aioredis.Redis, keys: Keys) -> QueueState:
    """The consolidation queue's state (a lost stream or group: ``exists`` False)."""
    stream = keys.consolidation_stream()
    seconds, micros = await client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    try:
        groups: Any = await client.xinfo_groups(stream)
    except ResponseError:
        return QueueState(False, 0, 0, None, now_ms)
    group = next((g for g in groups if _text(g["name"]) == GROUP), None)
    if group is None:
        return QueueState(False, 0, 0, None, now_ms)
    lag = await streams.lag(client, stream, group)
    ms = int(_text(group["last-delivered-id"]).partition("-")[0])
    return QueueState(True, lag, int(group["pending"]), ms or None, now_ms)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
