"""An error's retry hint (``StepError.retry_after``) is the least wait before the retry.

The worker schedules a failed step's retry at ``max(backoff, hint)``: a rate limit's
wait or a remote's Retry-After is honoured even when the backoff is tiny (the test
settings: 10-20 ms), and a hint shorter than the backoff does not shorten it. The
delay is read from Postgres (``steps.not_before - steps.updated_at`` and the
``step.retried`` event), not from the wall clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.coordination import delayed, streams
from orchestrator.coordination.ratelimit import RateLimited
from orchestrator.engine.worker import Worker
from orchestrator.errors import AgentError, ToolError, ToolNotApplied
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext
from tests.apps import TICKET, Done, TicketIn
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio


class Errors:
    """What the agent (``agent``) and its tool (``tool``) raise next, one per call."""

    def __init__(self) -> None:
        self.agent: list[Exception] = []
        self.tool: list[Exception] = []


def build(errors: Errors) -> App:
    app = App("retry-hint-test", version="test")

    @app.tool
    async def remote(value: str) -> dict[str, str]:
        if errors.tool:
            raise errors.tool.pop(0)
        return {"echo": value}

    @app.agent
    class Hinted(Agent[TicketIn, Done]):
        name = "hinted"
        input_model = TicketIn
        output_model = Done
        tools = ("remote",)

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            if errors.agent:
                raise errors.agent.pop(0)
            echoed = await ctx.tool("remote", value=data.ticket.subject)
            return Done(value=echoed["echo"])

    @app.tool(idempotent=False)
    async def charge(value: str, idempotency_key: str) -> dict[str, str]:
        if errors.tool:
            raise errors.tool.pop(0)
        return {"echo": value, "key": idempotency_key}

    @app.agent
    class Charger(Agent[TicketIn, Done]):
        name = "charger"
        input_model = TicketIn
        output_model = Done
        tools = ("charge",)

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            charged = await ctx.tool("charge", value=data.ticket.subject)
            return Done(value=charged["echo"])

    @app.agent
    class Once(Agent[TicketIn, Done]):
        name = "once"
        input_model = TicketIn
        output_model = Done
        max_attempts = 1

        async def run(self, ctx: StepContext, data: TicketIn) -> Done:
            raise AgentError("busy", retry_after=3.0)

    app.pipeline("hinted", ["hinted"], input_key="ticket")
    app.pipeline("once", ["once"], input_key="ticket")
    app.pipeline("charger", ["charger"], input_key="ticket")
    app.validate()
    return app


@pytest.fixture
def errors() -> Errors:
    return Errors()


@pytest.fixture
async def rt(settings: Settings, errors: Errors) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build(errors)) as runtime:
        yield runtime


async def _one(rt: Runtime, worker: Worker, agent: str) -> None:
    """Deliver the next entry of ``agent`` (moving due retries first) to ``worker``."""
    await streams.ensure_group(rt.redis, rt.keys, agent)
    await delayed.move_due(rt.redis, rt.keys)
    entries = await streams.read(rt.redis, rt.keys, agent, worker.consumer, count=1, block_ms=2000)
    assert len(entries) == 1
    await worker.process(agent, entries[0])


async def _scheduled(rt: Runtime) -> tuple[float, float]:
    """The one retry's delay as Postgres recorded it: (not_before - updated_at, the
    ``step.retried`` event's retry_after)."""
    [step] = await fetch(
        rt,
        "SELECT status, attempt, failures, "
        "extract(epoch FROM not_before - updated_at)::float8 AS wait FROM steps",
    )
    assert (step["status"], step["attempt"], step["failures"]) == ("queued", 2, 1)
    [event] = await fetch(rt, "SELECT data FROM events WHERE type = 'step.retried'")
    return step["wait"], event["data"]["retry_after"]


async def _fail_once(
    rt: Runtime, errors: Errors, where: str, exc: Exception
) -> tuple[float, float]:
    getattr(errors, where).append(exc)
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("hinted", TICKET)
    await _one(rt, worker, "hinted")
    assert (await client.get(wid)).status is WorkflowStatus.RUNNING
    return await _scheduled(rt)


HINTED: dict[str, tuple[str, Callable[[], Exception], float]] = {
    "agent error": ("agent", lambda: AgentError("busy", retry_after=3.0), 3.0),
    "tool error": ("tool", lambda: ToolError("slow down", tool="remote", retry_after=2.0), 2.0),
    "rate limited": ("agent", lambda: RateLimited("t1", 2.5), 2.5),
}


@pytest.mark.parametrize("case", list(HINTED))
async def test_the_retry_waits_at_least_the_errors_hint(
    rt: Runtime, errors: Errors, case: str
) -> None:
    where, make, hint = HINTED[case]
    wait, retry_after = await _fail_once(rt, errors, where, make())
    assert retry_after == hint  # the backoff here is at most 0.02 s
    assert hint - 0.01 <= wait <= hint + 0.01
    # Redis's delayed set holds the retry until then too: nothing is due yet.
    assert await delayed.move_due(rt.redis, rt.keys) == 0
    assert await rt.redis.zcard(rt.keys.delayed()) == 1


async def test_without_a_hint_the_retry_is_scheduled_by_the_backoff(
    rt: Runtime, errors: Errors
) -> None:
    wait, retry_after = await _fail_once(rt, errors, "agent", AgentError("busy"))
    cap = rt.settings.retry_cap_seconds
    assert rt.settings.retry_base_seconds <= retry_after <= cap
    assert wait <= cap + 0.01

    # ...and it runs again once that short delay is over.
    await anyio.sleep(cap + 0.03)
    await _one(rt, Worker(rt, concurrency=1), "hinted")
    [workflow] = await fetch(rt, "SELECT status FROM workflows")
    assert workflow["status"] == "completed"


async def test_a_hint_shorter_than_the_backoff_does_not_shorten_it(
    settings: Settings, errors: Errors
) -> None:
    slow = settings.model_copy(update={"retry_base_seconds": 1.5, "retry_cap_seconds": 1.5})
    async with runtime_for(slow, build(errors)) as rt:
        wait, retry_after = await _fail_once(
            rt, errors, "agent", AgentError("busy", retry_after=0.25)
        )
    assert retry_after == 1.5
    assert 1.49 <= wait <= 1.51


@pytest.mark.parametrize(
    ("pipeline", "exc"),
    [
        ("hinted", AgentError("spam", non_retryable=True, retry_after=3.0)),
        ("once", None),  # max_attempts = 1: its hinted failure is its last
    ],
)
async def test_a_hint_does_not_retry_a_step_that_may_not_retry(
    rt: Runtime, errors: Errors, pipeline: str, exc: Any
) -> None:
    if exc is not None:
        errors.agent.append(exc)
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit(pipeline, TICKET)
    await _one(rt, worker, pipeline)
    assert (await client.get(wid)).status is WorkflowStatus.FAILED
    assert await fetch(rt, "SELECT id FROM events WHERE type = 'step.retried'") == []
    assert len(await client.dead_letters()) == 1


async def test_a_non_idempotent_tool_refused_with_a_hint_is_retried_after_it(
    rt: Runtime, errors: Errors
) -> None:
    # A 429 with Retry-After: the remote certainly did nothing, and says when to come back.
    errors.tool.append(ToolNotApplied("429 Too Many Requests", retry_after=2.0))
    client, worker = Client(rt), Worker(rt, concurrency=1)
    wid = await client.submit("charger", TICKET)
    await _one(rt, worker, "charger")
    assert (await client.get(wid)).status is WorkflowStatus.RUNNING
    wait, retry_after = await _scheduled(rt)
    assert retry_after == 2.0 and 1.99 <= wait <= 2.01
    [run] = await fetch(rt, "SELECT status FROM tool_runs WHERE tool = 'charge'")
    assert run["status"] == "failed"  # not in doubt: the next attempt calls it again
