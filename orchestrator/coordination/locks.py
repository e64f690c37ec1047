"""A Redis lock with a random token: only its holder can extend or release it.

The token names its owner (the worker's consumer name), so a worker that
finds a step's lock held by a dead worker (its liveness key lapsed) can take
it over at once instead of waiting out the lease. The lock makes double work
rare; it is not what makes it harmless (that is the attempt fence in
Postgres), so losing Redis never breaks correctness.

A step's lock also names the attempt (fence) its holder runs under. After Redis
lost a lease, a stale execution (one whose attempt was since fenced out, say by a
reconciler requeue) re-takes its lock on its next heartbeat; a delivery of a newer
attempt takes the lock from it instead of waiting behind it, since nothing the
stale one does can land. A holder about to move the fence itself (a takeover, or a
lock just taken from a dead holder) names no attempt until it has moved it: the
attempt it was delivered under is not the one it will run under, and a second
delivery taking the lock from it as from a stale holder would move the fence again.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

# KEYS[1] lock key; ARGV[1] token. Returns 1 if deleted, 0 if held by someone else.
RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS[1] lock key; ARGV[1] token, ARGV[2] new TTL in ms. Returns 1 if extended, 0 if lost.
EXTEND = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] lock key; ARGV[1] token, ARGV[2] TTL in ms. Extends the holder's lock, or takes
# it again when it is gone (Redis lost it). Returns 1 if held now, 0 if someone else holds it.
KEEP = """
local held = redis.call('get', KEYS[1])
if held == ARGV[1] then
    redis.call('pexpire', KEYS[1], ARGV[2])
    return 1
end
if not held then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
# KEYS[1] lock key; ARGV[1] the token seen, ARGV[2] new token, ARGV[3] TTL in ms.
# Returns 1 if swapped, 0 if the lock changed hands meanwhile.
SWAP = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3])
    return 1
end
return 0
"""


def owner_of(token: bytes | str) -> str:
    """The owner (consumer name) a lock token names; "" when it names none."""
    text = token.decode(errors="replace") if isinstance(token, bytes) else token
    return text.rpartition("|")[0]


def fence_of(token: bytes | str) -> int | None:
    """The attempt a step lock's token names (``owner|attempt.random``); None for a lock
    that names none (a leader's, a reconciler's requeue)."""
    text = token.decode(errors="replace") if isinstance(token, bytes) else token
    attempt, dot, _ = text.rpartition("|")[2].partition(".")
    return int(attempt) if dot and attempt.isdigit() else None


class Lock:
    """A lock on the key ``name`` that expires after ``ttl_ms`` unless extended; its token
    names ``owner``, so others can tell whether its holder is dead."""

    def __init__(
        self,
        client: aioredis.Redis,
        name: str,
        ttl_ms: int,
        owner: str = "",
        via: Callable[[Callable[[Any], None]], Awaitable[list[Any]]] | None = None,
        fence: int | None = None,
        taking_over: bool = False,
    ) -> None:
        self.client = client
        # Where the first SET NX goes: a shared pipeline (coordination.pipelining), or alone.
        self.via = via
        self.name = name
        self.ttl_ms = ttl_ms
        self.owner = owner
        self.fence = fence  # the attempt the holder runs under (a step's lock), else None
        # A takeover's token names no attempt until ``refence`` (see the module's doc).
        self.token = _token(owner, None if taking_over else fence)
        self.stolen = False  # taken from a dead holder: whatever it ran must be fenced out

    async def acquire(self) -> bool:
        """Take the lock if nobody holds it (SET NX PX); False if someone does."""
        if self.via is not None:
            [taken] = await self.via(self.acquire_in)
            return bool(taken)
        return bool(await self.client.set(self.name, self.token, nx=True, px=self.ttl_ms))

    def acquire_in(self, pipe: Any) -> None:
        """Queue the SET NX PX that takes the lock on a pipeline."""
        pipe.set(self.name, self.token, nx=True, px=self.ttl_ms)

    async def take_over(self, is_dead: Callable[[str], Awaitable[bool]]) -> bool:
        """Acquire, or take the lock from a holder whose owner ``is_dead``."""
        if await self.acquire():
            return True
        held: Any = await self.client.get(self.name)
        if held is None:
            return await self.acquire()
        if held == self.token.encode():
            return True  # ours already (a retry after an outage)
        theirs = fence_of(held)
        if self.fence is not None and theirs is not None and theirs < self.fence:
            # Held under an attempt already fenced out (re-taken after Redis lost it):
            # this newer attempt is the step's, with no fence to move.
            return bool(await self.client.eval(SWAP, 1, self.name, held, self.token, self.ttl_ms))
        owner = owner_of(held)
        if not owner or not await is_dead(owner):
            return False
        token = _token(self.owner, None)  # it moves the fence: no attempt named until then
        self.stolen = bool(await self.client.eval(SWAP, 1, self.name, held, token, self.ttl_ms))
        if self.stolen:
            self.token = token
        return self.stolen

    async def refence(self, fence: int) -> None:
        """Name the attempt this holder runs under now (its takeover moved the fence), so a
        delivery of that attempt does not take the lock from it as from a stale holder. If
        the lock is not held now, the next heartbeat re-takes it under the new token."""
        old, self.fence = self.token, fence
        self.token = _token(self.owner, fence)
        await self.client.eval(SWAP, 1, self.name, old, self.token, self.ttl_ms)

    async def extend(self) -> bool:
        """Reset the TTL to ``ttl_ms`` if this token still holds the lock; False if lost."""
        return bool(await self.client.eval(EXTEND, 1, self.name, self.token, self.ttl_ms))

    async def release(self) -> bool:
        """Delete the lock if this token still holds it; False if it expired or is someone
        else's."""
        return bool(await self.client.eval(RELEASE, 1, self.name, self.token))

    async def release_quietly(self, within: float = 1.0) -> None:
        """Release now, even while being cancelled; best effort (it expires by itself)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(within):
            try:
                await self.release()
            except (RedisError, OSError, TimeoutError):
                pass

    def keep_in(self, pipe: Any) -> None:
        """Queue a heartbeat (extend, or re-take after Redis lost it) on a pipeline."""
        pipe.eval(KEEP, 1, self.name, self.token, self.ttl_ms)

    def release_in(self, pipe: Any) -> None:
        """Queue the release on a pipeline, so it rides the handoff round trip.

        EVAL, not EVALSHA: the script is tiny and a Redis restarted empty would
        otherwise answer NOSCRIPT inside the pipeline.
        """
        pipe.eval(RELEASE, 1, self.name, self.token)


def _token(owner: str, fence: int | None) -> str:
    tail = secrets.token_hex(12)
    return f"{owner}|{tail}" if fence is None else f"{owner}|{fence}.{tail}"
