"""Pub/Sub subscriptions kept between waits: reused while fresh, closed when stale or
when the block that used one failed; Client.wait opens no connection per call."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from orchestrator.client import Client
from orchestrator.coordination import subscriptions
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from tests.apps import TICKET, Probe, build_app
from tests.conftest import runtime_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, build_app(Probe())) as runtime:
        yield runtime


async def test_a_given_back_subscription_is_taken_again_with_what_it_buffered(
    rt: Runtime,
) -> None:
    channel = rt.keys.signal_channel()
    async with rt.subscriptions.subscribed([channel]) as first:
        pass
    await rt.redis.publish(channel, "while idle")
    async with rt.subscriptions.subscribed([channel]) as second:
        assert second is first
        # Subscribe confirmations read as None (ignored): the next message is the one.
        messages = [await second.get_message(timeout=2) for _ in range(3)]
        assert [m["data"] for m in messages if m is not None] == [b"while idle"]


async def test_a_stale_or_failed_subscription_is_closed_not_reused(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel = rt.keys.signal_channel()
    with pytest.raises(RuntimeError):
        async with rt.subscriptions.subscribed([channel]) as failed:
            raise RuntimeError("the waiter failed")
    async with rt.subscriptions.subscribed([channel]) as fresh:
        assert fresh is not failed
    monkeypatch.setattr(subscriptions, "IDLE_SECONDS", 0.0)
    async with rt.subscriptions.subscribed([channel]) as after_idle:
        assert after_idle is not fresh
    assert fresh.connection is None  # closed


async def test_a_burst_of_waits_keeps_only_a_few_subscriptions(rt: Runtime) -> None:
    channel = rt.keys.signal_channel()
    burst = subscriptions.MAX_IDLE + 5
    async with contextlib.AsyncExitStack() as stack:
        opened = [
            await stack.enter_async_context(rt.subscriptions.subscribed([channel]))
            for _ in range(burst)
        ]
    kept = [p for p in opened if p.connection is not None]
    assert len(kept) == subscriptions.MAX_IDLE  # the rest were closed on the way back


async def test_successive_waits_share_one_pubsub_connection(rt: Runtime) -> None:
    client = Client(rt)
    ids = [await client.submit("flaky", TICKET) for _ in range(3)]
    await Worker(rt, concurrency=2).run_until_idle()
    before = (await rt.redis.info("stats"))["total_connections_received"]
    for wid in ids:
        assert (await client.wait([wid], timeout=10))[wid].terminal
    after = (await rt.redis.info("stats"))["total_connections_received"]
    # One Pub/Sub connection at most for all three (each used to open its own).
    assert after - before <= 1
