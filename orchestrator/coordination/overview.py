"""What an operator sees of a deployment in Redis: live workers, queues, the reconciler leader.

Read only, and only from Redis (``orchestrator agents``): the workers' status
hashes, each agent's consumer group (XINFO GROUPS / CONSUMERS: lag, pending
entries per consumer), the consolidation queue's group and the reconciler's
leader lock, whose token names the worker holding it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from orchestrator.coordination import consolidation, status, streams
from orchestrator.coordination.keys import Keys
from orchestrator.coordination.locks import owner_of


@dataclass(frozen=True, slots=True)
class Consumer:
    """A consumer of a group (a worker): entries it holds unacknowledged, how long since it
    last read or claimed, and whether its liveness key is present."""

    name: str
    pending: int
    idle_ms: int
    alive: bool


@dataclass(frozen=True, slots=True)
class Group:
    """A consumer group: entries not delivered yet (``lag``; counted up to
    ``streams.LAG_SCAN`` on Redis 6.2) and delivered but not acknowledged (``pending``)."""

    stream: str
    name: str
    lag: int
    pending: int
    last_delivered_id: str
    consumers: tuple[Consumer, ...]


@dataclass(frozen=True, slots=True)
class Leader:
    """The reconciler's leader: the worker its lock names (empty when the token names none),
    whether that worker is alive, and the lock's remaining time (ms)."""

    name: str
    alive: bool
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class Overview:
    """Live workers; each agent's group (None: no stream or group yet); the consolidation
    queue's group (None when no worker consolidates); the reconciler leader (None: none)."""

    workers: tuple[status.WorkerStatus, ...]
    agents: dict[str, Group | None]
    consolidation: Group | None
    reconciler: Leader | None


async def group(client: aioredis.Redis, keys: Keys, stream: str, name: str) -> Group | None:
    """The group ``name`` of ``stream``; None when the stream or the group does not exist."""
    try:
        groups: Any = await client.xinfo_groups(stream)
        row = next((g for g in groups if _text(g["name"]) == name), None)
        if row is None:
            return None
        consumers: Any = await client.xinfo_consumers(stream, name)
    except ResponseError:
        return None  # no stream (or the group vanished meanwhile)
    names = [_text(c["name"]) for c in consumers]
    alive = await status.alive(client, keys, names)
    return Group(
        stream=stream,
        name=name,
        lag=await streams.lag(client, stream, row),
        pending=int(row["pending"]),
        last_delivered_id=_text(row["last-delivered-id"]),
        consumers=tuple(
            Consumer(n, int(c["pending"]), int(c["idle"]), a)
            for n, c, a in zip(names, consumers, alive, strict=True)
        ),
    )


async def leader(client: aioredis.Redis, keys: Keys) -> Leader | None:
    """Who holds the reconciler's leader lock; None when nobody does."""
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.reconciler_lock())
    pipe.pttl(keys.reconciler_lock())
    token, ttl = await pipe.execute()
    if token is None:
        return None
    name = owner_of(token)
    alive = bool(name) and (await status.alive(client, keys, [name]))[0]
    return Leader(name, alive, max(int(ttl), 0))


async def agent_streams(client: aioredis.Redis, keys: Keys) -> set[str]:
    """The agents that have a task stream under this prefix (a SCAN: for operators, not
    for the hot path)."""
    found = set()
    async for key in client.scan_iter(match=keys.streams(), count=1000, _type="STREAM"):
        agent = keys.agent_of(_text(key))
        if agent is not None:
            found.add(agent)
    return found


async def overview(client: aioredis.Redis, keys: Keys) -> Overview:
    """The whole picture, whichever app the workers run: every agent with a task stream
    (a backlog nobody serves included) or served by a live worker."""
    workers = await status.live_workers(client, keys)
    served = {a for w in workers for a in w.agents}
    groups: dict[str, Group | None] = {}
    for agent in sorted(await agent_streams(client, keys) | served):
        found = await group(client, keys, keys.stream(agent), keys.group(agent))
        groups[agent] = found
    return Overview(
        workers=tuple(workers),
        agents=groups,
        consolidation=await group(client, keys, keys.consolidation_stream(), consolidation.GROUP),
        reconciler=await leader(client, keys),
    )


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
