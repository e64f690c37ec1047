"""Migrations are versioned and idempotent."""

from __future__ import annotations

import asyncpg
import pytest

from orchestrator.runtime import Runtime
from orchestrator.store.migrations import MIGRATIONS, migrate
from tests.conftest import fetch, owner_connection

pytestmark = pytest.mark.anyio


async def test_applying_migrations_twice_is_a_no_op(support: Runtime) -> None:
    async with owner_connection(support) as conn:
        assert await migrate(conn) == []  # open_runtime already applied them
        assert await migrate(conn) == []
    versions = await fetch(support, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v["version"] for v in versions] == list(range(1, len(MIGRATIONS) + 1))


async def test_fresh_schema_gets_every_migration(support: Runtime) -> None:
    schema = f"{support.settings.db_schema}_fresh"
    async with owner_connection(support) as conn:
        await conn.execute(
            await conn.fetchval("SELECT format('CREATE SCHEMA %I', $1::text)", schema)
        )
        try:
            async with conn.transaction():
                await conn.execute("SELECT set_config('search_path', $1, true)", f"{schema},public")
                assert await migrate(conn) == list(range(1, len(MIGRATIONS) + 1))
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
            )
        finally:
            await conn.execute(
                await conn.fetchval("SELECT format('DROP SCHEMA %I CASCADE', $1::text)", schema)
            )
    assert {
        "workflows",
        "steps",
        "step_attempts",
        "checkpoints",
        "tool_runs",
        "events",
        "sessions",
        "messages",
        "memories",
        "schema_migrations",
    } <= {t["table_name"] for t in tables}


async def test_tool_run_keys_are_unique(support: Runtime) -> None:
    async with owner_connection(support) as conn:
        unique = await conn.fetchval("""
            SELECT count(*) FROM pg_indexes
            WHERE schemaname = current_schema() AND tablename = 'tool_runs'
              AND indexdef LIKE 'CREATE UNIQUE INDEX%(idempotency_key)'""")
    assert unique == 1
    assert isinstance(support.pool, asyncpg.Pool)
