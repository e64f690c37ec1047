"""Opening pooled clients for Redis and Postgres, with one-line errors when they are down."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from orchestrator.errors import ServiceUnavailable


async def connect_redis(url: str, *, max_connections: int = 128) -> aioredis.Redis:
    # A blocking pool: when every connection is busy a caller waits for one
    # instead of failing with "Too many connections" under load.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # owns and closes the pool
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        raise ServiceUnavailable("Redis", f"{redact(url)}: {exc}") from exc
    return client


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python values; asyncpg would otherwise hand back strings.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without RESET ALL: the runtime sets no session state, so skip a round trip."""


async def create_pool(dsn: str, *, schema: str = "public", size: int = 10) -> asyncpg.Pool:
    settings: dict[str, Any] = {
        "search_path": f"{schema},public",
        "application_name": "orchestrator",
    }
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            init=_init_connection,
            reset=_keep_session,
            server_settings=settings,
            timeout=10,
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise ServiceUnavailable("Postgres", f"{redact(dsn)}: {exc}") from exc
    return pool


def redact(url: str) -> str:
    """Hide a password in a URL before it reaches a log line or an error message."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
