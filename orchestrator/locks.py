"""A Redis lock with a random token: only its holder can extend or release it.

The lock makes double work rare; it is not what makes it harmless (that is
the attempt fence in Postgres), so losing Redis never breaks correctness.
"""

from __future__ import annotations

import secrets
from typing import Any

import redis.asyncio as aioredis

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


class Lock:
    def __init__(self, client: aioredis.Redis, name: str, ttl_ms: int) -> None:
        self.client = client
        self.name = name
        self.ttl_ms = ttl_ms
        self.token = secrets.token_hex(16)

    async def acquire(self) -> bool:
        return bool(await self.client.set(self.name, self.token, nx=True, px=self.ttl_ms))

    async def extend(self) -> bool:
        return bool(await self.client.eval(EXTEND, 1, self.name, self.token, self.ttl_ms))

    async def release(self) -> bool:
        return bool(await self.client.eval(RELEASE, 1, self.name, self.token))

    def release_in(self, pipe: Any) -> None:
        """Queue the release on a pipeline, so it rides the handoff round trip.

        EVAL, not EVALSHA: the script is tiny and a Redis restarted empty would
        otherwise answer NOSCRIPT inside the pipeline.
        """
        pipe.eval(RELEASE, 1, self.name, self.token)
