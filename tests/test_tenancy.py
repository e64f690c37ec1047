"""Tenants never see each other, in storage: row-level security, the application role,
the tenant set per transaction, the step's tenant from its workflow row, per-tenant
Redis keys, and injection strings that stay data."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.connections import create_pool
from orchestrator.coordination import streams
from orchestrator.coordination.keys import Keys
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.schemas import TaskEnvelope, WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.store import tenancy
from tests.conftest import fetch, owner_connection, runtime_for

pytestmark = pytest.mark.anyio

TENANT_TABLES = ("sessions", "workflows", "messages", "memories")
INJECTIONS = (
    "x'; DROP TABLE memories; --",
    "acme:wm:{s}",
    "' OR '1'='1",
    "%00 \\x00 100%",
    "🙂 {*} $1 \\",
)


async def _seed(conn: asyncpg.Connection, tenant: str, n: int) -> None:
    """``n`` sessions with one message and one memory each, for ``tenant`` (as the owner)."""
    await conn.execute(
        """
        WITH s AS (
            INSERT INTO sessions (id, tenant_id, customer_id)
            SELECT $1 || '-s' || i, $1, 'c' || i FROM generate_series(1, $2) i
            RETURNING id, customer_id
        ), m AS (
            INSERT INTO messages (session_id, tenant_id, role, author, content)
            SELECT id, $1, 'customer', customer_id, 'hello from ' || $1 FROM s
        )
        INSERT INTO memories (tenant_id, customer_id, kind, key, content, embedder)
        SELECT $1, customer_id, 'fact', id, 'likes tea (' || $1 || ')', 'none' FROM s
        """,
        tenant,
        n,
    )


async def test_the_runtime_runs_as_a_role_that_is_neither_owner_nor_superuser(
    support: Runtime,
) -> None:
    async with support.pool.acquire() as conn:
        me = await conn.fetchrow(
            "SELECT current_user AS name, rolsuper, rolbypassrls FROM pg_roles "
            "WHERE rolname = current_user"
        )
        tables = await conn.fetch(
            "SELECT relname, relrowsecurity, relforcerowsecurity, "
            "pg_get_userbyid(relowner) AS owner FROM pg_class "
            "WHERE relnamespace = current_schema()::regnamespace AND relname = ANY($1::text[])",
            list(TENANT_TABLES),
        )
    assert me is not None and me["name"] == "orchestrator_app"
    assert not me["rolsuper"] and not me["rolbypassrls"]
    assert {t["relname"] for t in tables} == set(TENANT_TABLES)
    for table in tables:
        assert table["relrowsecurity"] and table["relforcerowsecurity"], table["relname"]
        assert table["owner"] != "orchestrator_app"


async def test_alternating_tenants_on_one_connection_never_see_each_other(
    support: Runtime,
) -> None:
    """10,000 transactions over a pool of ONE connection, alternating tenants (and every
    third with no tenant at all): each sees exactly its own tenant's memories and
    transcript messages, and one with no tenant sees none."""
    async with owner_connection(support) as owner:
        await _seed(owner, "red", 7)
        await _seed(owner, "blue", 5)
    own = {"red": 14, "blue": 10, None: 0}  # memories + messages per tenant
    settings = support.settings
    assert settings.database_url
    pool = await create_pool(settings.database_url, schema=settings.db_schema, size=1)
    count = """
        SELECT count(*) FILTER (WHERE tenant_id = current_setting('orchestrator.tenant', true))
                   AS mine,
               count(*) FILTER (WHERE tenant_id IS DISTINCT FROM
                                      current_setting('orchestrator.tenant', true)) AS others
        FROM (SELECT tenant_id FROM memories UNION ALL SELECT tenant_id FROM messages) x
    """
    seen: dict[str | None, set[tuple[int, int]]] = {"red": set(), "blue": set(), None: set()}
    try:
        async with pool.acquire() as conn:
            for i in range(10_000):
                tenant = (None, "red", "blue")[i % 3]
                if tenant is None:
                    async with conn.transaction():
                        row = await conn.fetchrow(count)
                else:
                    async with tenancy.scoped(conn, tenant):
                        row = await conn.fetchrow(count)
                assert row is not None
                seen[tenant].add((row["mine"], row["others"]))
    finally:
        await pool.close()
    assert seen == {t: {(n, 0)} for t, n in own.items()}


async def test_a_rolled_back_transaction_does_not_leave_its_tenant_behind(
    support: Runtime,
) -> None:
    async with owner_connection(support) as owner:
        await _seed(owner, "red", 2)
    async with support.pool.acquire() as conn:
        with pytest.raises(asyncpg.DivisionByZeroError):
            async with tenancy.scoped(conn, "red"):
                await conn.fetchval("SELECT 1 / 0")
        assert await conn.fetchval("SELECT count(*) FROM memories") == 0
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0
        async with tenancy.scoped(conn, "red"):
            assert await conn.fetchval("SELECT count(*) FROM memories") == 2


async def test_a_tenant_cannot_write_rows_of_another(support: Runtime) -> None:
    async with support.pool.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with tenancy.scoped(conn, "acme"):
                await conn.execute(
                    "INSERT INTO memories (tenant_id, kind, key, content, embedder) "
                    "VALUES ('globex', 'fact', 'k', 'planted', 'none')"
                )
    assert await fetch(support, "SELECT 1 FROM memories WHERE content = 'planted'") == []


def test_redis_keys_are_namespaced_per_tenant_and_ids_cannot_escape_it() -> None:
    keys = Keys("orch")
    plain = keys.working_memory("acme", "s1")
    assert plain.startswith(keys.tenant("acme") + ":")
    # A tenant or session id shaped like another tenant's key lands elsewhere.
    for tenant, session in [("acme:wm:{s1}", "x"), ("acme", "s1}:x"), ("ac", "me:wm:{s1")]:
        key = keys.working_memory(tenant, session)
        assert key != plain and key.startswith(keys.tenant(tenant) + ":")
        assert not key.startswith(keys.tenant("acme") + ":") or tenant == "acme"
        # One hash tag only (the session's), so a Cluster slot is never chosen by an id.
        assert key.count("{") == 1 and key.count("}") == 1
    assert keys.recall_cache("a", "b") != keys.recall_cache("a:b", "")
    assert keys.memory_version("a", "b:c") != keys.memory_version("a:b", "c")


# The step's tenant comes from its workflow row, never from the envelope.


class Anything(AgentInput):
    pass


class Seen(AgentOutput):
    tenant: str
    customer: str


class Whoami(Agent[Anything, Seen]):
    name = "whoami"
    input_model = Anything
    output_model = Seen

    async def run(self, ctx: StepContext, data: Anything) -> Seen:
        return Seen(tenant=ctx.info.tenant_id, customer=ctx.info.customer_id)


class Note(BaseModel):
    text: str


def _app() -> App:
    app = App("tenancy")
    app.agent(Whoami)
    app.pipeline("whoami", ["whoami"], input_model=Note)
    return app


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, _app()) as runtime:
        yield runtime


async def test_a_forged_envelope_cannot_choose_the_steps_tenant(rt: Runtime) -> None:
    client = Client(rt)
    wid = await client.submit("whoami", Note(text="hi"), tenant="acme", customer="c-1")
    # Replace the queued envelope by one claiming another tenant (as a tampered or
    # buggy producer could): the step still runs as the workflow row's tenant.
    stream = rt.keys.stream("whoami")
    entries = await rt.redis.xrange(stream)
    assert len(entries) == 1
    original = streams.decode(streams.Entry(entries[0][0], entries[0][1]))
    forged: TaskEnvelope = original.model_copy(update={"tenant_id": "globex"})
    await rt.redis.delete(stream)
    await streams.enqueue(rt.redis, rt.keys, forged)
    worker = Worker(rt, concurrency=1, reconcile=False)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(15):
            result = await client.wait([wid], poll=0.05)
        worker.stop()
    assert result[wid] is WorkflowStatus.COMPLETED
    record = await client.get(wid)
    assert record.steps[0].output == {"tenant": "acme", "customer": "c-1"}


@pytest.mark.parametrize("evil", INJECTIONS)
async def test_injection_strings_as_ids_metadata_and_text_are_only_data(
    support: Runtime, evil: str
) -> None:
    from orchestrator.store import memory

    tenant = f"t-{evil}"
    async with support.pool.acquire() as conn:
        await memory.remember(
            conn,
            tenant_id=tenant,
            customer_id=evil,
            kind="fact",
            key=evil,
            content=f"remember {evil}",
            metadata={evil: evil},
            embedder=support.embedder.name,
            embedding=await support.embedder.embed(evil),
        )
        async with tenancy.scoped(conn, tenant):
            rows: list[Any] = await conn.fetch(
                "SELECT customer_id, key, content, metadata FROM memories"
            )
        async with tenancy.scoped(conn, "t-other"):
            assert await conn.fetchval("SELECT count(*) FROM memories") == 0
    assert [(r["customer_id"], r["key"], r["metadata"]) for r in rows] == [
        (evil, evil, {evil: evil})
    ]
    tables = await fetch(support, "SELECT count(*) AS n FROM memories")
    assert tables[0]["n"] >= 1  # still there: nothing was executed
