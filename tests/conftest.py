"""Fixtures: real Redis and real Postgres (+pgvector), one key prefix and schema per test.

``REDIS_URL`` / ``DATABASE_URL`` are used when set; otherwise the embedded
servers start once per session in a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from orchestrator.app import App
from orchestrator.embedded import embedded_postgres, embedded_redis
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server_urls() -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="orch-test-")))
        redis_url = os.environ.get("REDIS_URL") or stack.enter_context(
            embedded_redis(root / "redis")
        )
        database_url = os.environ.get("DATABASE_URL") or stack.enter_context(
            embedded_postgres(root / "pg")
        )
        yield {"REDIS_URL": redis_url, "DATABASE_URL": database_url}


@pytest.fixture
def settings(server_urls: dict[str, str], tmp_path: Path) -> Settings:
    suffix = secrets.token_hex(4)
    return Settings(
        REDIS_URL=server_urls["REDIS_URL"],
        DATABASE_URL=server_urls["DATABASE_URL"],
        OPENAI_API_KEY="",
        key_prefix=f"test-{suffix}",
        db_schema=f"test_{suffix}",
        home=tmp_path,
        block_ms=50,
        lease_seconds=5,
        retry_base_seconds=0.01,
        retry_cap_seconds=0.02,
    )


@contextlib.asynccontextmanager
async def runtime_for(settings: Settings, app: App) -> AsyncIterator[Runtime]:
    """A runtime on a fresh schema and key prefix, both removed afterwards."""
    try:
        async with open_runtime(settings, app) as runtime:
            yield runtime
    finally:
        await drop_test_data(settings)


async def drop_test_data(settings: Settings) -> None:
    import redis.asyncio as aioredis

    assert settings.database_url and settings.redis_url
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            await conn.fetchval(
                "SELECT format('DROP SCHEMA IF EXISTS %I CASCADE', $1::text)", settings.db_schema
            )
        )
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.key_prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def cli_env(settings: Settings) -> Iterator[dict[str, str]]:
    """Environment for a CLI subprocess on this test's schema and key prefix."""
    yield {
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
        "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
    }
    anyio.run(drop_test_data, settings)


@pytest.fixture
async def support(settings: Settings) -> AsyncIterator[Runtime]:
    from orchestrator.agents.support import app

    async with runtime_for(settings, app) as runtime:
        yield runtime


@contextlib.asynccontextmanager
async def owner_connection(runtime: Runtime) -> AsyncIterator[asyncpg.Connection]:
    """A connection as the database owner, on the test's schema: it sees every tenant's
    rows (row-level security binds the application role the runtime's pool uses) and may
    migrate."""
    settings = runtime.settings
    assert settings.database_url
    conn = await asyncpg.connect(
        settings.database_url, server_settings={"search_path": f"{settings.db_schema},public"}
    )
    try:
        await conn.set_type_codec(
            "jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )
        yield conn
    finally:
        await conn.close()


async def fetch(runtime: Runtime, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Rows as the database owner sees them (every tenant's)."""
    async with owner_connection(runtime) as conn:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
        return rows
