"""Per-tenant rate limit on model calls: a token bucket, atomic in one Lua script.

Redis' own clock (TIME) is used so workers on different machines agree. Losing
Redis resets the buckets, which only loosens the limit for a moment.
"""

from __future__ import annotations

import time

import anyio
import redis.asyncio as aioredis

from orchestrator.coordination.keys import Keys
from orchestrator.errors import StepError

# KEYS[1] bucket hash; ARGV[1] refill rate (tokens/s), ARGV[2] capacity, ARGV[3] cost.
# Returns {1, 0} when the tokens were taken, {0, ms} with the wait until they would be.
TAKE_TOKENS = """
local rate = tonumber(ARGV[1])
local capacity = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + (now - at) * rate / 1000)
local ttl = math.ceil(capacity / rate * 1000) + 1000
if tokens >= cost then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - cost), 'at', tostring(now))
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, 0}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ttl)
return {0, math.ceil((cost - tokens) * 1000 / rate)}
"""


class RateLimited(StepError):
    """The tenant's model budget is spent for now; retryable after ``retry_after`` seconds."""

    def __init__(self, tenant: str, retry_after: float) -> None:
        super().__init__(
            f"tenant {tenant!r} is over its model rate limit; retry in {retry_after:.2f}s"
        )
        self.tenant = tenant
        self.retry_after = retry_after


class RateLimiter:
    """One token bucket per tenant: ``rate`` tokens a second, holding at most ``burst``;
    ``take`` waits at most ``max_wait`` seconds. ValueError if rate <= 0 or burst < 1."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, rate: float, burst: float, max_wait: float
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.client = client
        self.keys = keys
        self.rate = rate
        self.burst = burst
        self.max_wait = max_wait

    async def try_take(self, tenant: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens now; return 0.0, or the seconds to wait if refused."""
        allowed, wait_ms = await self.client.eval(
            TAKE_TOKENS, 1, self.keys.rate_bucket(tenant), self.rate, self.burst, cost
        )
        return 0.0 if allowed else int(wait_ms) / 1000

    async def take(self, tenant: str, cost: float = 1.0) -> None:
        """Wait for tokens up to ``max_wait`` seconds, then raise a retryable RateLimited."""
        deadline = time.monotonic() + self.max_wait
        while True:
            wait = await self.try_take(tenant, cost)
            if wait == 0.0:
                return
            if time.monotonic() + wait > deadline:
                raise RateLimited(tenant, wait)
            await anyio.sleep(max(wait, 0.001))
