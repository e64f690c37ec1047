"""Cron schedules: once per tick across runtimes, across crashes, and the catch-up policy.

Every test passes explicit ``now=`` values to ``tick``: no sleeping, no real clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import anyio
import pytest
from pydantic import BaseModel

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.engine.schedules import tick
from orchestrator.errors import ConfigurationError
from orchestrator.runtime import Runtime, open_runtime
from orchestrator.settings import Settings
from orchestrator.step.agent import Agent, AgentInput, AgentOutput
from orchestrator.step.context import StepContext
from orchestrator.store import schedules as store
from orchestrator.store.schedules import MAX_CATCH_UP
from tests.conftest import fetch, runtime_for

pytestmark = pytest.mark.anyio

NAME = "nightly-digest"
FIRST_SEEN = datetime(2024, 3, 10, 12, 0, tzinfo=UTC)  # the 10th's 02:00 tick has passed
NIGHT_11 = datetime(2024, 3, 11, 2, 0, tzinfo=UTC)  # the first tick after first sight


class DigestInput(BaseModel):
    """The ``digest`` pipeline's input."""

    topic: str


class DigestIn(AgentInput):
    input: DigestInput


class Digest(AgentOutput):
    text: str


def digest_app(**schedule: Any) -> App:
    """One agent, the ``digest`` pipeline, and the schedule ``NAME`` (nightly by default)."""
    app = App("schedule-test", version="test")

    @app.agent
    class Digester(Agent[DigestIn, Digest]):
        name = "digester"
        input_model = DigestIn
        output_model = Digest

        async def run(self, ctx: StepContext, data: DigestIn) -> Digest:
            return Digest(text=f"digest of {data.input.topic}")

    app.pipeline("digest", ["digester"], input_model=DigestInput)
    options: dict[str, Any] = {
        "cron": "0 2 * * *",
        "pipeline": "digest",
        "input": DigestInput(topic="news"),
        **schedule,
    }
    app.schedule(NAME, **options)
    app.validate()
    return app


def key(tick_at: datetime) -> str:
    """The idempotency key the schedule's workflow for ``tick_at`` is submitted under."""
    return f"schedule:{NAME}:{tick_at.isoformat()}"


async def submitted(rt: Runtime) -> list[tuple[UUID, str]]:
    """Every workflow in the schema: (id, idempotency key), oldest tick first."""
    rows = await fetch(rt, "SELECT id, submit_key FROM workflows ORDER BY submit_key")
    return [(r["id"], r["submit_key"]) for r in rows]


async def last_tick(rt: Runtime) -> datetime | None:
    """The schedule's last handled tick, as Postgres has it."""
    async with rt.db() as conn:
        [row] = await store.list_schedules(conn)
    return row.last_tick


@pytest.fixture
async def rt(settings: Settings) -> AsyncIterator[Runtime]:
    async with runtime_for(settings, digest_app()) as runtime:
        yield runtime


async def test_first_sight_does_not_fire_then_each_tick_fires_once(rt: Runtime) -> None:
    assert await tick(rt, now=FIRST_SEEN) == []
    # First sight records the tick that just passed as handled: no burst on deploy.
    assert await last_tick(rt) == datetime(2024, 3, 10, 2, 0, tzinfo=UTC)
    assert await tick(rt, now=NIGHT_11 - timedelta(seconds=1)) == []
    assert await submitted(rt) == []

    [wid] = await tick(rt, now=NIGHT_11)  # due the moment it is reached
    assert await submitted(rt) == [(wid, key(NIGHT_11))]
    assert await last_tick(rt) == NIGHT_11
    assert await tick(rt, now=NIGHT_11) == []
    assert await tick(rt, now=NIGHT_11 + timedelta(hours=23)) == []

    night_12 = NIGHT_11 + timedelta(days=1)
    [second] = await tick(rt, now=night_12 + timedelta(seconds=5))
    assert second != wid
    assert await submitted(rt) == [(wid, key(NIGHT_11)), (second, key(night_12))]
    record = await Client(rt).get(second)
    assert (record.pipeline, record.tenant_id) == ("digest", "default")
    assert record.input == {"input": {"topic": "news"}}


async def test_concurrent_runtimes_submit_one_workflow_per_tick(
    rt: Runtime, settings: Settings
) -> None:
    await tick(rt, now=FIRST_SEEN)
    nights = [NIGHT_11 + timedelta(days=d) for d in range(4)]
    async with open_runtime(settings, rt.app) as other:
        for night in nights:
            results: list[list[UUID]] = []

            async def ticker(runtime: Runtime, now: datetime, into: list[list[UUID]]) -> None:
                into.append(await tick(runtime, now=now))

            async with anyio.create_task_group() as tg:
                for runtime in (rt, other, rt, other):
                    tg.start_soon(ticker, runtime, night, results)
            # Whoever submitted, every ticker that saw the tick due got the same workflow.
            assert len({wid for ids in results for wid in ids}) == 1
    found = await submitted(rt)
    assert [k for _, k in found] == [key(n) for n in nights]
    assert await last_tick(rt) == nights[-1]


async def test_missed_ticks_collapse_into_one_run_for_the_latest(rt: Runtime) -> None:
    await tick(rt, now=FIRST_SEEN)
    latest = NIGHT_11 + timedelta(days=4)  # down over five nightly ticks: 11th to 15th
    [wid] = await tick(rt, now=latest + timedelta(hours=3))
    assert await submitted(rt) == [(wid, key(latest))]
    assert await last_tick(rt) == latest


async def test_catch_up_all_submits_each_missed_tick_oldest_first(settings: Settings) -> None:
    async with runtime_for(settings, digest_app(catch_up="all")) as rt:
        await tick(rt, now=FIRST_SEEN)
        nights = [NIGHT_11 + timedelta(days=d) for d in range(5)]
        ids = await tick(rt, now=nights[-1] + timedelta(hours=3))
        assert await submitted(rt) == list(zip(ids, [key(n) for n in nights], strict=True))
        assert await last_tick(rt) == nights[-1]


async def test_catch_up_all_is_bounded_to_the_latest_ticks(settings: Settings) -> None:
    async with runtime_for(settings, digest_app(cron="* * * * *", catch_up="all")) as rt:
        await tick(rt, now=FIRST_SEEN)
        now = FIRST_SEEN + timedelta(minutes=250)
        ids = await tick(rt, now=now)
        assert len(set(ids)) == MAX_CATCH_UP
        first = now - timedelta(minutes=MAX_CATCH_UP - 1)
        [(_, oldest), *_] = await submitted(rt)
        assert oldest == key(first)
        assert await last_tick(rt) == now


async def test_submitted_but_unrecorded_tick_yields_the_same_workflow(rt: Runtime) -> None:
    await tick(rt, now=FIRST_SEEN)
    # A ticker that crashed after its submission committed, before recording the tick.
    wid = await Client(rt).submit(
        "digest", DigestInput(topic="news"), tenant="default", key=key(NIGHT_11)
    )
    assert await tick(rt, now=NIGHT_11 + timedelta(minutes=1)) == [wid]
    assert await submitted(rt) == [(wid, key(NIGHT_11))]
    assert await last_tick(rt) == NIGHT_11


async def test_crash_before_recording_the_tick_then_retry(
    rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    await tick(rt, now=FIRST_SEEN)
    real_advance = store.advance

    async def crash(*args: Any) -> bool:
        raise RuntimeError("killed between submit and advance")

    monkeypatch.setattr(store, "advance", crash)
    with pytest.raises(RuntimeError, match="killed"):
        await tick(rt, now=NIGHT_11)
    [(wid, _)] = await submitted(rt)
    monkeypatch.setattr(store, "advance", real_advance)
    assert await tick(rt, now=NIGHT_11 + timedelta(seconds=30)) == [wid]
    assert len(await submitted(rt)) == 1
    assert await last_tick(rt) == NIGHT_11


async def test_last_tick_only_moves_forward(rt: Runtime) -> None:
    await tick(rt, now=FIRST_SEEN)
    night_12 = NIGHT_11 + timedelta(days=1)
    async with rt.db() as conn:
        assert await store.advance(conn, NAME, night_12)
        # A ticker that read the older last tick (or runs on a slow clock) records late.
        assert not await store.advance(conn, NAME, NIGHT_11)
        assert not await store.advance(conn, NAME, night_12)
    assert await last_tick(rt) == night_12
    assert await tick(rt, now=night_12 + timedelta(hours=1)) == []


async def test_time_zone_moves_the_tick(settings: Settings) -> None:
    async with runtime_for(settings, digest_app(timezone="Europe/Paris")) as rt:
        await tick(rt, now=datetime(2024, 1, 14, 12, 0, tzinfo=UTC))
        two_in_paris = datetime(2024, 1, 15, 1, 0, tzinfo=UTC)  # CET is UTC+1 in winter
        assert await tick(rt, now=two_in_paris - timedelta(seconds=1)) == []
        [wid] = await tick(rt, now=two_in_paris)
        assert await submitted(rt) == [(wid, key(two_in_paris))]


async def test_changed_expression_keeps_the_last_tick(settings: Settings) -> None:
    async with open_runtime(settings, digest_app()) as rt:  # a deploy, then a restart
        await tick(rt, now=FIRST_SEEN)
    async with runtime_for(settings, digest_app(cron="0 * * * *")) as rt:
        now = FIRST_SEEN + timedelta(hours=5, minutes=30)
        [wid] = await tick(rt, now=now)  # latest only: 17:00, not 03:00 to 17:00
        assert await submitted(rt) == [(wid, key(FIRST_SEEN + timedelta(hours=5)))]
        async with rt.db() as conn:
            [row] = await store.list_schedules(conn)
        assert row.cron == "0 * * * *"


@pytest.mark.parametrize(
    ("cron", "why"),
    [
        ("0 25 * * *", "Bad hour"),
        ("every night", "needs 5 fields"),
        ("0 2 * *", "needs 5 fields"),
        ("0 0 2 * * *", "needs 5 fields"),  # six fields (seconds): not standard cron
        ("0 0 31 2 *", "Bad day-of-month"),
    ],
)
def test_bad_cron_expression_is_refused_at_registration(cron: str, why: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        digest_app(cron=cron)
    message = str(caught.value)
    assert message.startswith(f"schedule {NAME!r}: bad cron expression {cron!r}")
    assert why in message and "\n" not in message


def test_registration_mistakes() -> None:
    with pytest.raises(ConfigurationError, match="unknown time zone 'Mars/Olympus'"):
        digest_app(timezone="Mars/Olympus")
    with pytest.raises(ConfigurationError, match="catch_up must be"):
        digest_app(catch_up="some")
    app = digest_app()
    with pytest.raises(ConfigurationError, match=f"schedule {NAME!r} is registered twice"):
        app.schedule(NAME, cron="0 3 * * *", pipeline="digest", input={"topic": "x"})
    other = App("other")
    other.schedule(NAME, cron="0 3 * * *", pipeline="digest", input={"topic": "x"})
    with pytest.raises(ConfigurationError, match=f"schedule {NAME!r} is registered twice"):
        app.include(other)
    merged = App("merged")
    merged.include(app)
    assert merged.schedules == app.schedules


async def test_unknown_pipeline_or_unfit_input_fails_the_tick(settings: Settings) -> None:
    app = digest_app()
    app.schedule("typo", cron="0 3 * * *", pipeline="digets", input={"topic": "x"})
    async with runtime_for(settings, app) as rt:
        with pytest.raises(ConfigurationError, match="unknown pipeline 'digets'"):
            await tick(rt, now=FIRST_SEEN)
        del app.schedules["typo"]
        app.schedule("unfit", cron="0 3 * * *", pipeline="digest", input={"subject": "x"})
        with pytest.raises(ConfigurationError, match="schedule 'unfit': input of pipeline"):
            await tick(rt, now=FIRST_SEEN)
        assert await fetch(rt, "SELECT name FROM schedules") == []  # checked before any work
