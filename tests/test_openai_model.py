"""The real model path: the openai client over HTTP against a local compatible server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from orchestrator.agents.support import sample_tickets
from orchestrator.cli.demo import run_local
from orchestrator.client import Client
from orchestrator.coordination import delayed, streams
from orchestrator.engine.worker import Worker
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from tests.apps import TICKET, Probe, build_app
from tests.conftest import fetch, runtime_for
from tests.llm_server import ModelServer, Reply, answer, model_server, rate_limited, tool_calls

pytestmark = pytest.mark.anyio

TRIAGE = {
    "category": "billing",
    "priority": "high",
    "sentiment": "negative",
    "needs_research": True,
    "order_ids": ["ORD-10007"],
    "summary": "Charged twice.",
}
REPLY = {
    "reply": "Hi, the duplicate charge on ORD-10007 will be refunded.",
    "citations": ["ORD-10007", "kb-double-charge"],
}


def support_answers(body: dict[str, Any]) -> Reply:
    system = body["messages"][0]["content"]
    return answer(json.dumps(TRIAGE if system.startswith("You triage") else REPLY))


@pytest.fixture
def server() -> Iterator[ModelServer]:
    with model_server() as srv:
        yield srv


@pytest.fixture
def online(settings: Settings, server: ModelServer) -> Settings:
    return settings.model_copy(
        update={
            "openai_api_key": "test-key",
            "openai_base_url": server.url,
            "openai_model": "test-model",
            "openai_max_retries": 2,
        }
    )


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def rt(online: Settings, probe: Probe) -> AsyncIterator[Runtime]:
    async with runtime_for(online, build_app(probe)) as runtime:
        yield runtime


async def _run_once(rt: Runtime, agent: str) -> None:
    worker = Worker(rt, concurrency=1, reconcile=False)
    await streams.ensure_group(rt.redis, rt.keys, agent)
    await delayed.move_due(rt.redis, rt.keys)
    [entry] = await streams.read(rt.redis, rt.keys, agent, worker.consumer, count=1, block_ms=2000)
    await worker.process(agent, entry)


async def test_support_pipeline_on_a_real_client(online: Settings, server: ModelServer) -> None:
    from orchestrator.agents.support import app

    server.default = support_answers
    ticket = next(t for t in sample_tickets() if "ORD-10007" in t.body)
    async with runtime_for(online, app) as runtime:
        report = await run_local(runtime, [ticket], timeout=30)
        record = report.records[0]
        usage = await fetch(
            runtime,
            """
            SELECT s.agent, a.model, a.model_calls, a.prompt_tokens, a.completion_tokens
            FROM step_attempts a JOIN steps s ON s.id = a.step_id ORDER BY s.seq""",
        )
    assert record.status is WorkflowStatus.COMPLETED
    assert record.state["triage"]["category"] == "billing"
    assert record.state["triage"]["model"] == "test-model"
    assert record.state["response"]["citations"] == ["ORD-10007", "kb-double-charge"]
    assert sorted(tuple(u) for u in usage) == [
        ("knowledge_search", None, 0, 0, 0),
        ("order_lookup", None, 0, 0, 0),
        ("research", None, 0, 0, 0),
        ("response", "test-model", 1, 11, 7),
        ("triage", "test-model", 1, 11, 7),
    ]
    request = server.requests[0][1]
    assert request["model"] == "test-model"
    assert request["response_format"]["type"] == "json_schema"


async def test_model_chosen_tools_run_through_the_ledger(
    rt: Runtime, server: ModelServer, probe: Probe
) -> None:
    server.script.extend(
        [tool_calls(("lookup", {"value": "ORD-1"})), answer(json.dumps({"value": "found ORD-1"}))]
    )
    client = Client(rt)
    wid = await client.submit("chooser", TICKET)
    await _run_once(rt, "chooser")
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    assert record.steps[0].output == {"value": "found ORD-1"}
    assert probe.calls["lookup"] == 1
    runs = await fetch(rt, "SELECT idempotency_key, tool, status, result FROM tool_runs")
    assert [(r["idempotency_key"], r["tool"], r["status"]) for r in runs] == [
        (f"{wid}:0:0", "lookup", "succeeded")
    ]
    second = server.requests[1][1]
    tool_message = second["messages"][-1]
    assert tool_message["role"] == "tool" and json.loads(tool_message["content"]) == {
        "looked_up": "ORD-1"
    }
    offered = server.requests[0][1]["tools"][0]["function"]
    assert offered["name"] == "lookup" and "value" in offered["parameters"]["properties"]
    assert "idempotency_key" not in offered["parameters"]["properties"]
    usage = await fetch(
        rt, "SELECT model_calls, prompt_tokens, completion_tokens FROM step_attempts"
    )
    assert tuple(usage[0]) == (1, 13 + 11, 5 + 7)  # two turns of one call


async def test_429_is_retried_after_its_retry_after(rt: Runtime, server: ModelServer) -> None:
    server.script.extend([rate_limited(0.3), answer(json.dumps({"value": "ok"}))])
    client = Client(rt)
    wid = await client.submit("chooser", TICKET)
    await _run_once(rt, "chooser")
    assert (await client.get(wid)).status is WorkflowStatus.COMPLETED
    (first, _), (second, _) = server.requests
    assert second - first >= 0.25  # the client waited as the server asked


async def test_malformed_output_is_a_retryable_error_and_nothing_is_lost(
    rt: Runtime, server: ModelServer
) -> None:
    server.script.extend([answer("this is not JSON"), answer(json.dumps({"value": "ok"}))])
    client = Client(rt)
    wid = await client.submit("chooser", TICKET)
    await _run_once(rt, "chooser")  # attempt 1: malformed
    import anyio

    await anyio.sleep(0.05)  # the retry's backoff (10-20 ms in tests)
    await _run_once(rt, "chooser")  # attempt 2
    record = await client.get(wid)
    assert record.status is WorkflowStatus.COMPLETED
    attempts = await fetch(rt, "SELECT attempt, outcome, error FROM step_attempts ORDER BY attempt")
    assert [(a["attempt"], a["outcome"]) for a in attempts] == [(1, "failed"), (2, "completed")]
    assert "malformed Done" in attempts[0]["error"]
