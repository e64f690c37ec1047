"""Recalled memories cached per session in Redis (speed only: Postgres is the truth).

One hash per session (``keys.recall_cache``), a field per query (named by the
caller: ``orchestrator.step.recall`` digests query, k, kinds, embedder and
customers), the TTL refreshed on every write. The step reaches the cache as
the runtime's ``recall_cache`` (the ``RecallCache`` protocol of
``orchestrator.step.services``), never by importing this module.
Each value carries the memory versions of the customer and of the tenant-wide
memories (``keys.memory_version``) read *before* Postgres was asked: whoever
writes a memory bumps its version after the commit, so a result computed
before that write no longer matches and the next recall goes to Postgres.
A version is a random token, never a counter: a version key that expired (or
was evicted) and was bumped again can never repeat an old entry's version.
Each value also carries when it was made: older than the TTL is a miss, so an
entry made before a version key expired cannot match its absence either.

A corrupt value, or Redis down, is a miss (logged): never a failed step.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestrator.coordination.keys import Keys

log = logging.getLogger("orchestrator.recall")

MAX_ENTRIES = 8  # queries cached per session; a full hash starts over
MAX_VALUE_BYTES = 4096  # a larger result is not cached (the session's Redis stays small)
VERSION_TTL_SECONDS = 7 * 86_400  # longer than any entry may live (see effective_ttl)
# connections.REDIS_DOWN, spelled out as locks.py does: importing orchestrator.connections
# would tie the Redis side to the Postgres side (it imports the store).
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

# KEYS[1] the session's recall hash
# ARGV[1] field, ARGV[2] value, ARGV[3] TTL (seconds), ARGV[4] most fields kept
# Starts the hash over when it is full (a session recalling many different queries
# keeps at most that many), then sets the field and refreshes the TTL. Returns 1.
PUT = """
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4])
   and redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
    redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


@dataclass(frozen=True, slots=True)
class Lookup:
    """A cache lookup: ``value`` is the cached result, or None on a miss; ``versions``
    are the memory versions read with it (pass them to ``put`` after a miss)."""

    value: dict[str, Any] | None
    versions: tuple[str, str] | None


def effective_ttl(ttl_seconds: int) -> int:
    """The cache TTL, kept below the version keys' so an entry never outlives them."""
    return max(1, min(ttl_seconds, VERSION_TTL_SECONDS // 2))


class RecallCache:
    """The recall cache of the runtime's Redis; ``ttl_seconds`` from the settings."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, ttl_seconds: int) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl = effective_ttl(ttl_seconds)

    async def get(self, tenant: str, session: str, customer: str, name: str) -> Lookup:
        """The cached value of field ``name``, or a miss: none there, made before a memory
        of the customer (or of the whole tenant) was written, too old, or corrupt."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._keys.recall_cache(tenant, session), name)
        pipe.mget(
            self._keys.memory_version(tenant, customer), self._keys.memory_version(tenant, "")
        )
        try:
            raw, (mine, shared) = await pipe.execute()
        except REDIS_DOWN as exc:
            log.warning("recall cache unavailable (a miss): %s", exc)
            return Lookup(None, None)
        versions = (_text(mine), _text(shared))
        if raw is None:
            return Lookup(None, versions)
        try:
            entry = json.loads(raw)
            fresh = time.time() - float(entry["at"]) <= self._ttl
            current = tuple(entry["versions"]) == versions
            value = entry["value"]
            if not isinstance(value, dict):
                raise TypeError(f"value is a {type(value).__name__}")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning(
                "corrupt recall cache entry %s of session %r (a miss): %s", name, session, exc
            )
            return Lookup(None, versions)
        return Lookup(value if fresh and current else None, versions)

    async def put(
        self,
        tenant: str,
        session: str,
        name: str,
        versions: tuple[str, str] | None,
        value: dict[str, Any],
    ) -> bool:
        """Cache ``value`` (JSON-able) under field ``name`` with the ``versions`` its lookup
        read; False when it was not cached (too large, or Redis down)."""
        if versions is None:  # the lookup could not read them
            return False
        entry = json.dumps({"versions": list(versions), "at": time.time(), "value": value})
        if len(entry.encode()) > MAX_VALUE_BYTES:
            return False
        key = self._keys.recall_cache(tenant, session)
        try:
            await self._redis.eval(PUT, 1, key, name, entry, self._ttl, MAX_ENTRIES)
        except REDIS_DOWN as exc:
            log.warning("recall cache unavailable (not cached): %s", exc)
            return False
        return True


async def bump(redis: aioredis.Redis, keys: Keys, tenant: str, customer: str) -> None:
    """Say that a memory of ``customer`` (``""``: tenant-wide) was written: cached recalls
    made before no longer match. Call it after the memory's commit."""
    pipe = redis.pipeline(transaction=False)
    bump_in(pipe, keys, tenant, customer)
    await pipe.execute()


def bump_in(pipe: Any, keys: Keys, tenant: str, customer: str) -> None:
    """``bump``, queued on a pipeline (one round trip with other commands)."""
    pipe.set(keys.memory_version(tenant, customer), secrets.token_hex(8), ex=VERSION_TTL_SECONDS)


def _text(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw or ""
