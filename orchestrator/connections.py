"""Pooled clients for Redis and Postgres: bounded timeouts, one-line errors when down.

Every network call the runtime makes is bounded: a black-holed server shows up
as a timeout within seconds, never as a hang. Failures of the runtime's own
Redis and Postgres calls are translated into ``ServiceUnavailable`` at the
source (``pg`` and ``redis_errors``), so the worker can tell them apart from an
agent's or tool's own exceptions, which are step failures.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from orchestrator.errors import OrchestratorError, ServiceUnavailable
from orchestrator.store import Conn

# Postgres failures that say nothing about the statement: the server or the
# network is (temporarily) gone. 57P01 admin shutdown and the client's own
# "another operation is in progress" after a restart included.
PG_DOWN: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    # Transient by nature: the same work succeeds when tried again.
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)
PG_ANY: tuple[type[BaseException], ...] = (*PG_DOWN, asyncpg.PostgresError)
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
# What a background loop waits out: any infrastructure failure, translated or raw.
OUTAGE: tuple[type[BaseException], ...] = (ServiceUnavailable, *REDIS_DOWN, *PG_DOWN)


def redis_broke(exc: BaseException) -> bool:
    """Whether ``exc`` (raw, or as ``ServiceUnavailable``) is a broken Redis connection: a
    restart or a refusal, not a timeout (a black hole) and not a Postgres failure."""
    cause = exc.__cause__ if isinstance(exc, ServiceUnavailable) else exc
    return isinstance(cause, RedisConnectionError)


async def drop_idle_connections(client: aioredis.Redis, after: BaseException) -> None:
    """Close the pool's idle connections when the failure ``after`` is ``redis_broke``.
    Once Redis restarted, every pooled connection is dead alike; left in the pool, each
    would fail one more command (a lease, a heartbeat, a liveness refresh) before
    reconnecting, while the steps behind those commands back off and look silent. The
    next commands connect afresh. Any other failure leaves the pool as it is."""
    if not redis_broke(after):
        return
    with contextlib.suppress(RedisError, OSError):
        await client.connection_pool.disconnect(inuse_connections=False)


async def connect_redis(
    url: str,
    *,
    max_connections: int = 128,
    timeout: float = 5.0,
    block_seconds: float = 1.0,
    required: bool = True,
) -> aioredis.Redis:
    """A Redis client on a pool of at most ``max_connections``, pinged once; ``timeout``
    and ``block_seconds`` (the longest XREADGROUP BLOCK) are in seconds. Raises
    ``ServiceUnavailable`` when Redis cannot be reached, unless not ``required``: then the
    client is returned anyway (it connects when Redis is back)."""
    # A blocking pool: when every connection is busy a caller waits for one
    # instead of failing with "Too many connections" under load. The socket
    # timeout covers the longest blocking read (XREADGROUP BLOCK) plus ``timeout``.
    tcp: dict[str, Any] = {} if url.startswith("unix:") else {"socket_keepalive": True}
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout * 2,
        socket_connect_timeout=timeout,
        socket_timeout=timeout + block_seconds,
        health_check_interval=30,
        **tcp,
    )
    client: aioredis.Redis = aioredis.Redis.from_pool(pool)  # owns and closes the pool
    try:
        await client.ping()
    except REDIS_DOWN as exc:
        if not required:
            logging.getLogger(__name__).warning("Redis unavailable (%s): %s", redact(url), exc)
            return client
        await client.aclose()
        raise ServiceUnavailable("Redis", f"{redact(url)}: {exc}") from exc
    return client


# Every pooled connection runs as the application role (neither owner nor superuser,
# so row-level security applies) with the engine's scope; a tenant's memories and
# transcripts are read only in a transaction that sets the tenant (store.tenancy).
APP_SESSION = """
SELECT set_config('role', 'orchestrator_app', false),
       set_config('orchestrator.engine', 'on', false)
"""


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb in and out as Python values; asyncpg would otherwise hand back strings.
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.execute(APP_SESSION)


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without RESET ALL: the runtime sets no session state, so skip a round trip."""


async def create_pool(
    dsn: str, *, schema: str = "public", size: int = 10, timeout: float = 10.0
) -> asyncpg.Pool:
    """A pool of at most ``size`` Postgres connections, opened on demand, with ``schema``
    first on the search path and jsonb as Python values. ``timeout`` (seconds) bounds
    connecting and every statement."""
    settings: dict[str, Any] = {
        "search_path": f"{schema},public",
        "application_name": "orchestrator",
    }
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            # No floor: asyncpg would log a traceback for every failed attempt to
            # restore it during an outage. Connections open on demand and are kept.
            min_size=0,
            max_size=size,
            init=_init_connection,
            reset=_keep_session,
            server_settings=settings,
            timeout=timeout,  # connecting
            command_timeout=timeout,  # every statement
        )
    except PG_ANY as exc:
        raise ServiceUnavailable("Postgres", f"{redact(dsn)}: {exc}") from exc
    return pool


@contextlib.asynccontextmanager
async def pg(pool: asyncpg.Pool, *, timeout: float = 10.0) -> AsyncIterator[Conn]:
    """A pooled connection for the runtime's own statements.

    Infrastructure failures become ``ServiceUnavailable``; the connection they
    hit is terminated, not returned to the pool (after a timeout asyncpg would
    otherwise wait, unbounded, for its cancel request to reach the server).
    """
    try:
        conn = await pool.acquire(timeout=timeout)
    except PG_DOWN as exc:
        raise ServiceUnavailable("Postgres", _describe(exc)) from exc
    try:
        yield conn
    except PG_DOWN as exc:
        _discard(conn)
        raise ServiceUnavailable("Postgres", _describe(exc)) from exc
    except (asyncpg.PostgresError, OrchestratorError):
        # The server answered (or our own code refused): the connection is fine,
        # unless a transaction was left open.
        if conn.is_in_transaction():
            _discard(conn)
        raise
    except BaseException:
        _discard(conn)  # cancelled mid-statement, or a defect: its state is unknown
        raise
    finally:
        with contextlib.suppress(*PG_DOWN):
            await pool.release(conn, timeout=timeout)


def _discard(conn: Conn) -> None:
    """Close a connection for good. asyncpg may have detached it from its pool proxy
    already (the server closed it mid-statement): then there is nothing left to do."""
    with contextlib.suppress(*PG_DOWN):
        if not conn.is_closed():
            conn.terminate()


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Translate the runtime's own Redis failures into ``ServiceUnavailable``."""
    try:
        yield
    except REDIS_DOWN as exc:
        raise ServiceUnavailable("Redis", _describe(exc)) from exc


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def redact(url: str) -> str:
    """Hide a password in a URL before it reaches a log line or an error message."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"
