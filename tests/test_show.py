"""`orchestrator show`: the whole story of one workflow; replays recorded; id prefixes."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from tests.conftest import fetch
from tests.cost_app import Probe, build_cost_app, priced_runtime, scripted_model

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(settings: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with priced_runtime(settings, build_cost_app(probe), scripted_model()) as runtime:
        yield runtime


async def test_a_replayed_tool_call_is_recorded_with_the_step(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = 1  # attempt 1 calls the tool and fails; attempt 2 replays it
    wid = await Client(rt).submit("plan_write", {"topic": "refund"})
    await Worker(rt, reconcile=False).run_until_idle(timeout=60)
    assert probe.lookups == 1
    events = await fetch(
        rt,
        "SELECT type, data FROM events WHERE workflow_id = $1 AND type = 'tool.replayed'",
        wid,
    )
    assert [e["data"] for e in events] == [
        {
            "key": f"{wid}:0:0",
            "tool": "lookup",
            "ordinal": 0,
            "attempt": 2,
            "recorded_attempt": 1,
        }
    ]
