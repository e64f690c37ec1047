"""Erasure (``orchestrator forget``): nothing of the customer remains in Postgres or Redis;
everyone else's data is untouched; the audit record holds no personal data."""

from __future__ import annotations

import json
from typing import Any
from uuid import UUID

import pytest

from orchestrator.agents.ticket import Ticket
from orchestrator.cli.demo import run_local
from orchestrator.cli.maintenance import forget_customer
from orchestrator.client import Client
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from tests.conftest import fetch, owner_connection
from tests.test_cli import run_cli

pytestmark = pytest.mark.anyio

CUSTOMER = "cus-forget-7f3a"
INJECTION = "x'; DROP TABLE memories; --"
# Distinctive words of each customer's tickets, found anywhere means not erased.
GONE = ("MARMALADE", "QUOKKA")
OTHER = "PERSIMMON"  # another customer of the same tenant
ELSEWHERE = "KUMQUAT"  # the same customer id in another tenant
INJECTED = "TAMARIND"

ROW_TEXTS = (
    "SELECT format('SELECT t::text AS row FROM %I t', tablename) AS sql FROM pg_tables "
    "WHERE schemaname = current_schema()"
)
OTHERS_MESSAGES = "SELECT * FROM messages WHERE content LIKE ANY($1) ORDER BY id"


def ticket(tenant: str, customer: str, word: str, session: str | None = None) -> Ticket:
    return Ticket(
        tenant_id=tenant,
        customer_id=customer,
        session_id=session,
        subject=f"{word} order charged twice",
        body=f"My order ORD-10007 was charged twice. {word} is my code word.",
    )


async def every_row(rt: Runtime) -> list[str]:
    """Every row of every table of the schema, as text (all columns), as the owner sees it."""
    async with owner_connection(rt) as conn:
        rows: list[str] = []
        for q in await conn.fetch(ROW_TEXTS):
            rows += [r["row"] for r in await conn.fetch(q["sql"])]
        return rows


async def every_redis_value(rt: Runtime) -> list[bytes]:
    """Every key of the test's prefix and everything it holds."""
    seen: list[bytes] = []
    async for key in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*"):
        seen.append(key)
        kind = (await rt.redis.type(key)).decode()
        if kind == "string":
            seen.append(await rt.redis.get(key))
        elif kind == "hash":
            seen += [b for kv in (await rt.redis.hgetall(key)).items() for b in kv]
        elif kind == "stream":
            for _, fields in await rt.redis.xrange(key):
                seen += list(fields.values())
        elif kind == "zset":
            seen += await rt.redis.zrange(key, 0, -1)
    return seen


def found(haystack: list[str] | list[bytes], needle: str) -> int:
    low = needle.lower()
    return sum(
        low in (h.decode(errors="replace") if isinstance(h, bytes) else h).lower() for h in haystack
    )


async def remember(rt: Runtime, tenant: str, customer: str, text: str, source: Any = None) -> None:
    await fetch(
        rt,
        "INSERT INTO memories (tenant_id, customer_id, kind, key, content, embedder, "
        "source_workflow) VALUES ($1, $2, 'fact', $3, $4, 'lexical', $5)",
        tenant,
        customer,
        f"k-{text}",
        text,
        source,
    )


async def working_memory(rt: Runtime, tenant: str, customer: str, session: str, text: str) -> None:
    k = rt.keys
    await rt.redis.set(k.working_memory(tenant, session), json.dumps({"v": 1, "goal": text}))
    await rt.redis.hset(k.recall_cache(tenant, session), "q", json.dumps([text]))
    await rt.redis.set(k.memory_version(tenant, customer), 3)


async def test_forget_leaves_nothing_of_the_customer_and_touches_no_one_else(
    support: Runtime,
) -> None:
    session = f"chat-{CUSTOMER}"  # a caller-chosen session id that names the customer
    tickets = [
        ticket("acme", CUSTOMER, "MARMALADE", session),
        ticket("acme", CUSTOMER, "QUOKKA"),
        ticket("acme", "cus-keep-1", OTHER),
        ticket("globex", CUSTOMER, ELSEWHERE),
        ticket("acme", INJECTION, INJECTED),
    ]
    report = await run_local(support, tickets, concurrency=4, timeout=60)
    assert {r.status for r in report.records} == {WorkflowStatus.COMPLETED}
    mine = [r.id for r in report.records[:2]]
    sessions = [r["id"] for r in await fetch(support, "SELECT id FROM sessions")]
    assert session in sessions
    # Memories (own, one distilled from their workflow, other people's), step questions,
    # signals, failed attempts, dead letters and working memory, all naming them.
    await remember(support, "acme", CUSTOMER, "MARMALADE fan, prefers email")
    await remember(support, "acme", "", "MARMALADE orders get double-charged", mine[0])
    await remember(support, "acme", "cus-keep-1", f"{OTHER} likes phone calls")
    await remember(support, "globex", CUSTOMER, f"{ELSEWHERE} prefers chat")
    await remember(support, "acme", INJECTION, f"{INJECTED} remembers")
    await fetch(
        support,
        "UPDATE steps SET question = 'QUOKKA?', replies = '[\"QUOKKA yes\"]' "
        "WHERE workflow_id = $1 AND seq = 0",
        mine[0],
    )
    await fetch(
        support,
        "INSERT INTO signals (workflow_id, name, payload) VALUES ($1, 'note', '\"QUOKKA\"')",
        mine[1],
    )
    await fetch(
        support,
        "INSERT INTO dead_letters (workflow_id, agent, reason, envelope) "
        "VALUES ($1, 'triage', 'QUOKKA broke it', '{\"payload\": \"QUOKKA\"}')",
        mine[1],
    )
    await fetch(
        support,
        "UPDATE step_attempts SET error = 'QUOKKA failed' "
        "WHERE step_id = (SELECT id FROM steps WHERE workflow_id = $1 AND seq = 0)",
        mine[1],
    )
    for s in sessions:
        owner = (
            await fetch(support, "SELECT tenant_id, customer_id FROM sessions WHERE id = $1", s)
        )[0]
        await working_memory(support, owner["tenant_id"], owner["customer_id"], s, f"goal of {s}")
    assert await fetch(
        support, "SELECT 1 FROM tool_runs WHERE workflow_id = ANY($1::uuid[])", mine
    ), "the pipeline ran tools for them"
    before = await every_row(support)
    assert all(found(before, w) for w in (*GONE, CUSTOMER, OTHER, ELSEWHERE, INJECTED))
    redis_before = await every_redis_value(support)
    assert found(redis_before, "MARMALADE") and found(redis_before, OTHER)  # stream entries
    others_before = await fetch(support, OTHERS_MESSAGES, [f"%{OTHER}%", f"%{ELSEWHERE}%"])

    erasure = await forget_customer(support, "acme", CUSTOMER)

    rows = await every_row(support)
    redis_values = await every_redis_value(support)
    # The same customer id in globex is another person: only rows of that tenant (or its
    # workflow) may name it.
    theirs = ("globex", str(report.records[3].id))
    for needle in (*GONE, CUSTOMER, session):
        hits = [r for r in rows if needle.lower() in r.lower()]
        assert all(any(t in r for t in theirs) for r in hits), (needle, hits[:3])
        named = [v.decode() for v in redis_values if needle.lower().encode() in v.lower()]
        assert all(any(t in v for t in theirs) for v in named), (needle, named[:3])
    assert not found(rows, "MARMALADE") and not found(redis_values, "MARMALADE")
    keys = [k.decode() async for k in support.redis.scan_iter(match=f"{support.keys.prefix}:*")]
    assert not [k for k in keys if "acme" in k and CUSTOMER in k]
    assert [k for k in keys if "globex" in k and CUSTOMER in k]  # the other tenant's stays
    for word in (OTHER, ELSEWHERE, INJECTED):
        assert found(rows, word) == found(before, word), word
        assert found(redis_values, word) == found(redis_before, word), word
    others_after = await fetch(support, OTHERS_MESSAGES, [f"%{OTHER}%", f"%{ELSEWHERE}%"])
    assert others_after == others_before

    # The workflows stay as skeletons: status and timings, payloads erased, never resumed.
    skeletons = await fetch(
        support, "SELECT status, input, pruned_at FROM workflows WHERE id = ANY($1::uuid[])", mine
    )
    assert [(s["status"], s["input"]) for s in skeletons] == [("completed", {"erased": True})] * 2
    assert all(s["pruned_at"] is not None for s in skeletons)
    # The audit record: the tenant and counts, nothing of the customer (the scan above
    # covered its table too).
    audit = await fetch(support, "SELECT id, tenant_id, counts FROM erasures")
    assert [(a["id"], a["tenant_id"]) for a in audit] == [(erasure.erasure_id, "acme")]
    counts = audit[0]["counts"]
    assert counts["workflows"] == 2 and counts["sessions"] == 2 and counts["memories"] >= 2
    assert counts["messages"] >= 4 and counts["tool_runs"] >= 1 and counts["redis_keys"] == 5
    assert counts["redis_entries"] >= 2

    # An id that looks like SQL is data: it erases that customer, and nothing else happens.
    await forget_customer(support, "acme", INJECTION)
    rows = await every_row(support)
    assert not found(rows, INJECTED) and not found(rows, INJECTION)
    assert found(rows, OTHER) == found(before, OTHER)
    assert await fetch(support, "SELECT 1 FROM memories WHERE content LIKE $1", f"{OTHER}%")


async def test_an_unfinished_workflow_is_refused_unless_cancelled(support: Runtime) -> None:
    client = Client(support)
    wid = await client.submit("support", ticket("acme", CUSTOMER, "MARMALADE"))  # no worker
    with pytest.raises(InvalidInput, match="1 unfinished workflow"):
        await forget_customer(support, "acme", CUSTOMER)
    with pytest.raises(InvalidInput, match="customer id"):
        await forget_customer(support, "acme", "")  # '' is the tenant's shared knowledge
    assert await fetch(support, "SELECT 1 FROM messages WHERE workflow_id = $1", wid)
    assert not await fetch(support, "SELECT 1 FROM erasures")

    settings = support.settings
    env = {
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
        "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
    }
    result = run_cli(
        *("forget", "--tenant", "acme", "--customer", CUSTOMER, "--cancel", "--yes", "--json"),
        env=env,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["tenant_id"] == "acme" and printed["counts"]["workflows"] == 1
    assert UUID(printed["erasure_id"]) and CUSTOMER not in result.stdout
    status = await fetch(support, "SELECT status FROM workflows WHERE id = $1", wid)
    assert status[0]["status"] == "cancelled"
    assert not await fetch(support, "SELECT 1 FROM messages WHERE workflow_id = $1", wid)
