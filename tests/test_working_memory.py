"""Working memory of a session in Redis, end to end on real Redis and Postgres.

Two agents in a row (``first`` calls a tool, speaks and sets the goal; ``second``
speaks) record what ``ctx.memory.working()`` showed them into a ``Probe`` owned by the
test. Redis is flushed for the test's keys only (the shared server is never flushed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from pydantic import BaseModel
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.coordination import working_memory as wm
from orchestrator.coordination.working_memory import WorkingMemoryCache
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.schemas import memory as values
from orchestrator.schemas.memory import Line, WorkingMemory
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.testing import AgentHarness
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio
TENANT = "acme"


class Ask(BaseModel):
    text: str


class AskIn(AgentInput):
    input: Ask


class Out(AgentOutput):
    value: str


class Probe:
    def __init__(self) -> None:
        self.seen: list[tuple[str, UUID, WorkingMemory]] = []  # (agent, workflow, memory)

    def of(self, agent: str, workflow_id: UUID) -> WorkingMemory:
        [memory] = [m for a, w, m in self.seen if a == agent and w == workflow_id]
        return memory


def build_app(probe: Probe) -> App:
    app = App("memory-test", version="test")

    @app.tool
    async def lookup(text: str) -> dict[str, str]:
        """Look the text up."""
        return {"found": f"record for {text}"}

    @app.agent
    class First(Agent[AskIn, Out]):
        name = "first"
        input_model = AskIn
        output_model = Out
        tools = ("lookup",)

        async def run(self, ctx: StepContext, data: AskIn) -> Out:
            probe.seen.append((self.name, ctx.info.workflow_id, await ctx.memory.working()))
            await ctx.tool("lookup", text=data.input.text)
            ctx.say(f"first answer to {data.input.text}")
            ctx.memory.set_goal(f"solve {data.input.text}")
            return Out(value="ok")

    @app.agent
    class Second(Agent[AskIn, Out]):
        name = "second"
        input_model = AskIn
        output_model = Out

        async def run(self, ctx: StepContext, data: AskIn) -> Out:
            probe.seen.append((self.name, ctx.info.workflow_id, await ctx.memory.working()))
            ctx.say(f"second answer to {data.input.text}")
            return Out(value="ok")

    app.pipeline("two", ["first", "second"], input_model=Ask)
    app.validate()
    return app


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(probe)) as runtime:
        yield runtime


async def _run(rt: Runtime, text: str, session: str, customer: str = "cust-1") -> UUID:
    client = Client(rt)
    wid = await client.submit(
        "two", Ask(text=text), tenant=TENANT, session=session, customer=customer
    )
    await Worker(rt, concurrency=1).run_until_idle(timeout=20)
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED, (await client.get(wid)).error
    return wid


async def _stored(rt: Runtime, session: str) -> WorkingMemory | None:
    return await wm.load(rt.redis, rt.keys, TENANT, session)


async def _memory_events(rt: Runtime, wid: UUID) -> list[tuple[str, str, dict[str, Any]]]:
    rows = await fetch(
        rt,
        """SELECT s.agent, e.type, e.data FROM events e JOIN steps s ON s.id = e.step_id
           WHERE e.workflow_id = $1 AND e.type LIKE 'memory.%' ORDER BY e.id""",
        wid,
    )
    return [(r["agent"], r["type"], r["data"]) for r in rows]


async def _flush_test_keys(rt: Runtime) -> None:
    """FLUSHALL for this test: every key under its prefix (the server is shared)."""
    keys = [k async for k in rt.redis.scan_iter(match=f"{rt.keys.prefix}:*")]
    if keys:
        await rt.redis.delete(*keys)


async def test_working_memory_holds_the_steps_lines_tool_outputs_and_goal(
    rt: Runtime, probe: Probe
) -> None:
    wid = await _run(rt, "printer jam", "s-1")

    # The first step found nothing in Redis and rebuilt from Postgres (the customer's
    # message); the second read what the first appended, without touching Postgres.
    first, second = probe.of("first", wid), probe.of("second", wid)
    assert [m.role for m in first.messages] == ["customer"]
    assert "printer jam" in first.messages[0].content
    assert [m.content for m in second.messages][1:] == ["first answer to printer jam"]
    assert [t.tool for t in second.tools] == ["lookup"]
    assert "record for printer jam" in second.tools[0].result
    assert second.goal == "solve printer jam"
    events = await _memory_events(rt, wid)
    assert events[0] == (
        "first",
        "memory.hydrated",
        {"reason": "missing", "messages": 1, "sessions": 1, "tools": 0, "goal": False},
    )
    assert [e[:2] for e in events[1:]] == [("first", "memory.goal")]

    stored = await _stored(rt, "s-1")
    assert stored is not None and stored.workflow == str(wid)
    assert [m.content for m in stored.messages][1:] == [
        "first answer to printer jam",
        "second answer to printer jam",
    ]
    ttl = await rt.redis.ttl(rt.keys.working_memory(TENANT, "s-1"))
    assert 0 < ttl <= rt.settings.working_memory_ttl_seconds


@pytest.mark.parametrize("damage", ["flush", "corrupt"])
async def test_lost_or_corrupt_working_memory_is_rebuilt_from_postgres(
    rt: Runtime, probe: Probe, damage: str
) -> None:
    await _run(rt, "router down", "s-2")
    key = rt.keys.working_memory(TENANT, "s-2")
    if damage == "flush":
        await _flush_test_keys(rt)
    else:
        await rt.redis.set(key, b"\xff{not json", ex=60)

    wid2 = await _run(rt, "router still down", "s-2")

    first = probe.of("first", wid2)
    assert [m.content for m in first.messages if m.role == "agent"] == [
        "first answer to router down",
        "second answer to router down",
    ]
    assert "router still down" in first.messages[-1].content
    assert [t.tool for t in first.tools] == []  # tool outputs are the workflow's own
    [hydrated] = [e for e in await _memory_events(rt, wid2) if e[1] == "memory.hydrated"]
    assert hydrated[0] == "first"
    assert hydrated[2]["reason"] == ("missing" if damage == "flush" else "corrupt")
    assert hydrated[2]["messages"] == 4
    stored = await _stored(rt, "s-2")
    assert stored is not None and stored.workflow == str(wid2)


async def test_value_stays_under_the_cap_newest_lines_kept(rt: Runtime) -> None:
    keys, session = rt.keys, "s-cap"
    cap = rt.settings.working_memory_max_bytes
    seed = WorkingMemory("wf", 0, messages=(Line("customer", "c", "hello", 1),))
    await wm.store(rt.redis, keys, TENANT, session, seed, ttl_seconds=60, max_bytes=cap)
    pipe = rt.redis.pipeline(transaction=False)
    for seq in range(1, 41):
        patch = values.Patch(
            "wf",
            f"step-{seq}",
            seq,
            messages=[Line("agent", "a", f"line {seq} " + "é" * 900)],
            tools=[values.tool_output("t", {"blob": "x" * 5_000})],
        )
        wm.append_in(pipe, keys, TENANT, session, patch, ttl_seconds=60, max_bytes=cap)
    # A step's append arriving twice, and an append from another ticket.
    wm.append_in(
        pipe,
        keys,
        TENANT,
        session,
        values.Patch("wf", "step-40", 40, messages=[Line("agent", "a", "again")]),
        ttl_seconds=60,
        max_bytes=cap,
    )
    results = await pipe.execute()
    assert results == [1] * 40 + [2]

    raw = await rt.redis.get(keys.working_memory(TENANT, session))
    assert len(raw) <= cap - values.KEY_OVERHEAD_BYTES
    value = WorkingMemory.from_json(raw)
    assert value.seq == 40 and value.messages[-1].content.startswith("line 40 ")
    assert value.messages[0].content.startswith("line ")  # the oldest went first
    assert len(value.tools) == values.MAX_TOOLS
    assert all(len(t.result) <= values.TOOL_RESULT_CHARS for t in value.tools)
    usage = await rt.redis.memory_usage(keys.working_memory(TENANT, session))
    assert usage <= cap  # the value with Redis's own bookkeeping

    other = values.Patch("wf-2", "s", 0, messages=[Line("agent", "a", "x")])
    pipe = rt.redis.pipeline(transaction=False)
    wm.append_in(pipe, keys, TENANT, session, other, ttl_seconds=60, max_bytes=cap)
    wm.append_in(pipe, keys, TENANT, session, other, ttl_seconds=60, max_bytes=cap)
    assert await pipe.execute() == [3, 0]  # stale: dropped, then stays missing


async def test_redis_outage_rebuilds_without_failing_the_step(rt: Runtime, probe: Probe) -> None:
    """A working-memory read that fails on Redis is rebuilt from Postgres, not written."""
    from orchestrator.step.info import StepInfo
    from orchestrator.step.memory import SessionMemory

    wid = await _run(rt, "modem", "s-out")
    await _flush_test_keys(rt)
    broken = rt.redis.__class__(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )  # nothing listens there
    try:

        class Down:
            def __getattr__(self, name: str) -> Any:
                return getattr(rt, name)

            working_memory = WorkingMemoryCache(
                broken,
                rt.keys,
                ttl_seconds=rt.settings.working_memory_ttl_seconds,
                max_bytes=rt.settings.working_memory_max_bytes,
            )

        info = StepInfo(wid, wid, 9, "second", 1, TENANT, "test", "two", "s-out", "cust-1")
        memory = SessionMemory(Down(), info)  # type: ignore[arg-type]
        value = await memory.working()
    finally:
        await broken.aclose()
    assert len(value.messages) == 3
    assert memory.record()[0][1]["reason"] == "redis unavailable"
    assert await _stored(rt, "s-out") is None


async def test_harness_memory_works_on_the_tests_data(probe: Probe) -> None:
    harness = AgentHarness(build_app(probe), transcript=["my order never came"])
    flow = await harness.run_pipeline("two", Ask(text="order"))
    assert flow.status is WorkflowStatus.COMPLETED
    second = probe.seen[-1][2]
    assert [m.content for m in second.messages] == [
        "my order never came",
        "text='order'",  # the submitted input, as a worker's transcript has it
        "first answer to order",
    ]
    assert flow.step("first").memory_events[0][0] == "memory.hydrated"
    assert json.loads(json.dumps(flow.step("first").memory_events))  # JSON, as committed
