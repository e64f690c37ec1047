"""After a Redis restart, the pool's dead connections fail once in all, not once each."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator.connections import connect_redis, drop_idle_connections, redis_broke
from tests.fault.servers import RedisServer

pytestmark = pytest.mark.anyio

CONCURRENT = 8


async def _fill_pool(client: aioredis.Redis) -> None:
    """Leave ``CONCURRENT`` connections idle in the pool (commands that overlap)."""
    async with anyio.create_task_group() as tg:
        for n in range(CONCURRENT):
            tg.start_soon(client.blpop, [f"nothing-{n}"], 0.2)


async def _failures(client: aioredis.Redis) -> list[BaseException]:
    """Run ``CONCURRENT`` commands at once; the broken-connection errors they raise."""
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await client.ping()
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENT):
            tg.start_soon(one)
    return errors


async def test_a_broken_connection_drops_the_idle_ones() -> None:
    with RedisServer() as server:
        client = await connect_redis(server.url)
        try:
            # Without the drop: every concurrent command draws a dead connection.
            await _fill_pool(client)
            await anyio.to_thread.run_sync(server.restart)
            storm = await _failures(client)
            assert len(storm) > 1 and all(redis_broke(e) for e in storm)

            # With it: the first failure clears the pool, the rest connect afresh.
            await _fill_pool(client)
            await anyio.to_thread.run_sync(server.restart)
            with pytest.raises(Exception) as first:
                await client.ping()
            assert redis_broke(first.value)
            await drop_idle_connections(client, first.value)
            assert await _failures(client) == []
        finally:
            await client.aclose()
