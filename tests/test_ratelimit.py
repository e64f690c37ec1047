"""The per-tenant token bucket on model calls (real Redis, one Lua script)."""

from __future__ import annotations

import time

import anyio
import pytest

from orchestrator.agents.support import sample_tickets
from orchestrator.cli.demo import run_local
from orchestrator.coordination.ratelimit import RateLimited, RateLimiter
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import Settings
from tests.conftest import runtime_for

pytestmark = pytest.mark.anyio


async def test_burst_then_refusal_with_a_retry_time(support: Runtime) -> None:
    limiter = RateLimiter(support.redis, support.keys, rate=5, burst=2, max_wait=0)
    assert await limiter.try_take("acme") == 0.0
    assert await limiter.try_take("acme") == 0.0
    wait = await limiter.try_take("acme")
    assert 0.0 < wait <= 0.2
    assert await limiter.try_take("globex") == 0.0  # buckets are per tenant
    with pytest.raises(RateLimited) as refused:
        await limiter.take("acme")
    assert refused.value.non_retryable is False and refused.value.retry_after > 0


async def test_concurrent_takers_never_exceed_the_bucket(support: Runtime) -> None:
    limiter = RateLimiter(support.redis, support.keys, rate=0.001, burst=5, max_wait=0)
    granted: list[bool] = []

    async def one() -> None:
        granted.append(await limiter.try_take("acme") == 0.0)

    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(one)
    assert granted.count(True) == 5


async def test_waiting_caller_gets_its_token_after_refill(support: Runtime) -> None:
    limiter = RateLimiter(support.redis, support.keys, rate=20, burst=1, max_wait=2)
    await limiter.take("acme")
    start = time.monotonic()
    await limiter.take("acme")
    assert time.monotonic() - start >= 0.03  # had to wait for the refill


async def test_pipeline_model_calls_respect_the_tenant_limit(settings: Settings) -> None:
    from orchestrator.agents.support import app

    limited = settings.model_copy(update={"model_rate_per_second": 20.0, "model_burst": 2.0})
    async with runtime_for(limited, app) as runtime:
        start = time.monotonic()
        report = await run_local(runtime, sample_tickets()[:4], concurrency=4, timeout=60)
        seconds = time.monotonic() - start
    assert {r.status for r in report.records} == {WorkflowStatus.COMPLETED}
    # Up to 8 model calls for one tenant at 20/s after a burst of 2 take >= ~0.2 s.
    model_calls = sum(
        len([s for s in r.steps if s.agent in ("triage", "response")])
        for r in report.records
        if r.tenant_id == "acme"
    )
    assert model_calls >= 4 and seconds >= (model_calls - 2) / 20 * 0.9
