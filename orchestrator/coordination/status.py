"""Live agent status (Redis hashes with a TTL): a view for humans, never a source of truth.

Each worker refreshes one hash per agent it serves, and one about itself (its
agents, start time and in-flight steps, listed in the ``workers`` set), about
once a second, from the steps it is running, instead of writing them on every
step: the view stays live and the hot path stays two Redis round trips per step.
The same refresh carries the worker's liveness key, which says whether its steps
may be taken over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from orchestrator.coordination.keys import Keys
from orchestrator.schemas import TaskEnvelope


def fields(running: Sequence[TaskEnvelope], last: TaskEnvelope | None) -> dict[FieldT, EncodableT]:
    """``running`` oldest first; ``last`` the most recent step this consumer took."""
    if running:
        newest = running[-1]
        return {
            "status": "running",
            "current_task": f"{newest.workflow_id}:{newest.seq}",
            "assigned_by": newest.assigned_by,
            "checkpoint": newest.seq - 1,
            "in_flight": len(running),
        }
    return {
        "status": "idle",
        "current_task": "",
        "assigned_by": last.assigned_by if last else "",
        "checkpoint": last.seq if last else -1,
        "in_flight": 0,
    }


async def alive(client: aioredis.Redis, keys: Keys, consumers: Sequence[str]) -> list[bool]:
    """Whether each worker (stream consumer) still refreshes its liveness key: one round trip."""
    pipe = client.pipeline(transaction=False)
    for consumer in consumers:
        pipe.exists(keys.worker_alive(consumer))
    return [bool(n) for n in await pipe.execute()]


def mark_alive_in(pipe: Any, keys: Keys, consumer: str, ttl_seconds: float) -> None:
    """Queue the refresh of a worker's liveness key on a pipeline."""
    pipe.set(keys.worker_alive(consumer), "1", px=int(ttl_seconds * 1000))


def mark_in(pipe: Any, key: str, values: dict[FieldT, EncodableT], ttl: int) -> None:
    """Queue a status update on a pipeline."""
    pipe.hset(key, mapping={**values, "last_updated": f"{time.time():.3f}"})
    pipe.expire(key, ttl)


@dataclass(frozen=True, slots=True)
class InFlight:
    """A step a worker is running: its workflow, step, agent, attempt (the fence) and
    when it started (Unix seconds, the worker's clock)."""

    workflow_id: str
    step_id: str
    seq: int
    agent: str
    attempt: int
    started_at: float

    @classmethod
    def of(cls, envelope: TaskEnvelope, started_at: float) -> InFlight:
        """The in-flight record of ``envelope``, running since ``started_at``."""
        return cls(
            str(envelope.workflow_id),
            str(envelope.step_id),
            envelope.seq,
            envelope.agent,
            envelope.attempt,
            round(started_at, 3),
        )


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """What a worker says about itself in its status hash; times in Unix seconds."""

    name: str  # its stream consumer name
    host: str
    pid: int
    app: str  # name and version of the app it runs
    agents: tuple[str, ...]
    concurrency: int  # slots per agent
    started_at: float
    updated_at: float
    in_flight: tuple[InFlight, ...] = ()


def mark_worker_in(pipe: Any, keys: Keys, worker: WorkerStatus, ttl: int) -> None:
    """Queue the refresh of a worker's status hash (and its ``workers`` entry) on a pipeline."""
    key = keys.worker_status(worker.name)
    pipe.hset(
        key,
        mapping={
            "host": worker.host,
            "pid": worker.pid,
            "app": worker.app,
            "agents": json.dumps(worker.agents),
            "concurrency": worker.concurrency,
            "started_at": f"{worker.started_at:.3f}",
            "last_updated": f"{worker.updated_at:.3f}",
            "in_flight": json.dumps([asdict(step) for step in worker.in_flight]),
        },
    )
    pipe.expire(key, ttl)
    pipe.sadd(keys.workers(), worker.name)


def parse_worker(name: str, raw: dict[bytes, bytes]) -> WorkerStatus | None:
    """A worker's status from its hash; None when the hash is gone or unreadable (this is
    a view: a bad hash is skipped, not an error)."""
    if not raw:
        return None
    try:
        text = {k.decode(): v.decode() for k, v in raw.items()}
        steps = tuple(InFlight(**step) for step in json.loads(text.get("in_flight", "[]")))
        return WorkerStatus(
            name=name,
            host=text.get("host", ""),
            pid=int(text.get("pid", 0)),
            app=text.get("app", ""),
            agents=tuple(json.loads(text.get("agents", "[]"))),
            concurrency=int(text.get("concurrency", 0)),
            started_at=float(text.get("started_at", 0)),
            updated_at=float(text.get("last_updated", 0)),
            in_flight=steps,
        )
    except (ValueError, TypeError, UnicodeDecodeError):
        return None


async def live_workers(client: aioredis.Redis, keys: Keys) -> list[WorkerStatus]:
    """Workers whose liveness key is present, by name, as their status hashes say: two
    round trips."""
    members: Any = await client.smembers(keys.workers())
    names = sorted(m.decode(errors="replace") for m in members)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.worker_alive(name))
        pipe.hgetall(keys.worker_status(name))
    replies = await pipe.execute()
    found = []
    for i, name in enumerate(names):
        status = parse_worker(name, replies[2 * i + 1]) if replies[2 * i] else None
        if status is not None:
            found.append(status)
    return found


async def drop_gone_workers(client: aioredis.Redis, keys: Keys) -> int:
    """Remove from the ``workers`` set the workers whose status hash expired; how many."""
    members: Any = await client.smembers(keys.workers())
    names = list(members)
    if not names:
        return 0
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.exists(keys.worker_status(name.decode(errors="replace")))
    gone = [n for n, present in zip(names, await pipe.execute(), strict=True) if not present]
    if gone:
        await client.srem(keys.workers(), *gone)
    return len(gone)


async def gone(client: aioredis.Redis, keys: Keys, consumer: str) -> None:
    """A worker stopping on purpose: its liveness key, status hash and ``workers`` entry go,
    in one round trip (whatever it still holds is taken over at once)."""
    pipe = client.pipeline(transaction=False)
    pipe.delete(keys.worker_alive(consumer), keys.worker_status(consumer))
    pipe.srem(keys.workers(), consumer)
    await pipe.execute()
