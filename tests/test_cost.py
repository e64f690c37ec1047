"""Cost accounting on real Postgres: per attempt, step, workflow and tenant; `runs --sort
cost`; per-tenant budgets that stop model calls; the price table."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from uuid import UUID

import pytest

from orchestrator.agents import support as support_app
from orchestrator.client import Client
from orchestrator.engine.worker import Worker
from orchestrator.models.llm import OFFLINE_MODEL_NAME, Usage
from orchestrator.models.pricing import Pricing
from orchestrator.runtime import Runtime
from orchestrator.schemas import WorkflowStatus
from orchestrator.settings import ModelPrice, Settings
from orchestrator.store import tenancy
from orchestrator.store.workflows import RunOrder
from orchestrator.testing import ScriptedModel
from tests.conftest import fetch, owner_connection
from tests.cost_app import (
    PLAN_USD,
    WRITE_USD,
    Probe,
    build_cost_app,
    priced_runtime,
    scripted_model,
)
from tests.test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.anyio


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
def model() -> ScriptedModel:
    return scripted_model()


@pytest.fixture
async def rt(settings: Settings, probe: Probe, model: ScriptedModel) -> AsyncIterator[Runtime]:
    async with priced_runtime(settings, build_cost_app(probe), model) as runtime:
        yield runtime


async def _run(rt: Runtime, *submissions: tuple[str, str]) -> list[UUID]:
    """Submit (pipeline, tenant) pairs, one after the other, and drain the queues."""
    client, ids = Client(rt), []
    for pipeline, tenant in submissions:
        ids.append(await client.submit(pipeline, {"topic": "refund"}, tenant=tenant))
        await Worker(rt, concurrency=2, reconcile=False).run_until_idle(timeout=60)
    return ids


async def test_costs_add_up_per_attempt_step_workflow_and_tenant(rt: Runtime, probe: Probe) -> None:
    probe.failures_left = 1  # the planner fails once after its model call: two attempts
    first, second, other = await _run(
        rt, ("plan_write", "acme"), ("write", "acme"), ("write", "globex")
    )
    attempts = await fetch(
        rt,
        """SELECT s.agent, a.attempt, a.outcome, a.model, a.cost_usd
           FROM step_attempts a JOIN steps s ON s.id = a.step_id
           WHERE s.workflow_id = $1 ORDER BY s.seq, a.attempt""",
        first,
    )
    assert [tuple(a) for a in attempts] == [
        ("planner", 1, "failed", "scripted-model", PLAN_USD),
        ("planner", 2, "completed", "scripted-model", PLAN_USD),
        ("writer", 1, "completed", "scripted-model", WRITE_USD),
    ]
    # Per step: its attempts summed; per workflow: the column those commits kept.
    assert await rt.store.costs.step_costs(first) == [
        (0, "planner", 2 * PLAN_USD),
        (1, "writer", WRITE_USD),
    ]
    rows = await fetch(rt, "SELECT id, cost_usd FROM workflows")
    assert {r["id"]: r["cost_usd"] for r in rows} == {
        first: 2 * PLAN_USD + WRITE_USD,
        second: WRITE_USD,
        other: WRITE_USD,
    }
    # Per tenant: a query over its workflows.
    tenants = await rt.store.costs.tenant_costs()
    assert [(t.tenant_id, t.workflows, t.cost_usd) for t in tenants] == [
        ("acme", 2, 2 * PLAN_USD + 2 * WRITE_USD),
        ("globex", 1, WRITE_USD),
    ]
    assert [t.cost_usd for t in await rt.store.costs.tenant_costs("globex")] == [WRITE_USD]


def _env(settings: Settings) -> dict[str, str]:
    """The CLI's environment on the test's schema and key prefix (``cli_env`` for async
    tests: the runtime fixture drops the test data)."""
    return {
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "ORCHESTRATOR_DB_SCHEMA": settings.db_schema,
        "ORCHESTRATOR_KEY_PREFIX": settings.key_prefix,
    }


async def test_runs_sort_by_cost(rt: Runtime) -> None:
    cli_env = _env(rt.settings)
    free, top, mid = await _run(rt, ("free", "acme"), ("spend", "acme"), ("write", "acme"))
    by_cost = await Client(rt).runs(order=RunOrder.COST)
    assert [(r["id"], r["cost_usd"]) for r in by_cost] == [
        (top, 2 * WRITE_USD),
        (mid, WRITE_USD),
        (free, 0),
    ]
    newest = await Client(rt).runs()
    assert [r["id"] for r in newest] == [mid, top, free]

    listed = run_cli("runs", "--sort", "cost", env={**cli_env, "COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    assert sorted([free, top, mid], key=lambda w: listed.stdout.index(str(w))) == [top, mid, free]
    assert "$0.024" in listed.stdout and "$0.012" in listed.stdout
    assert run_cli("runs", "--sort", "price", env=cli_env).returncode == 2  # usage error


async def test_a_spent_budget_stops_the_next_steps_model_calls(
    rt: Runtime, model: ScriptedModel
) -> None:
    cli_env = _env(rt.settings)
    await _run(rt, ("write", "acme"))  # $0.012 spent before the budget exists
    set_out = run_cli("budget", "set", "--tenant", "acme", "--usd", "0.02", env=cli_env)
    assert set_out.returncode == 0, set_out.stderr
    assert "budget of tenant acme: $0.02 (spent $0.012, $0.008 left)" in set_out.stdout

    # Under budget when it opens: runs, and overruns ($0.024 of $0.02).
    # Then the next step of the tenant finds it spent: no model call, a clear failure.
    within, stopped, elsewhere = await _run(
        rt, ("write", "acme"), ("plan_write", "acme"), ("write", "globex")
    )
    client = Client(rt)
    assert (await client.get(within)).status is WorkflowStatus.COMPLETED
    assert (await client.get(elsewhere)).status is WorkflowStatus.COMPLETED
    failed = await client.get(stopped)
    assert failed.status is WorkflowStatus.FAILED
    assert failed.error is not None
    assert failed.error.startswith("planner: BudgetExceeded: tenant 'acme' has spent its model")
    assert "($0.0240 of $0.02)" in failed.error
    assert "orchestrator budget set --tenant acme --usd N" in failed.error
    assert [c.purpose for c in model.calls] == ["write", "write", "write"]  # none for planner
    attempts = await fetch(
        rt,
        """SELECT a.outcome, a.model_calls FROM step_attempts a JOIN steps s ON s.id = a.step_id
           WHERE s.workflow_id = $1""",
        stopped,
    )
    assert [tuple(a) for a in attempts] == [("failed", 0)]  # never retried

    shown = run_cli("budget", "show", "--json", env=cli_env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [
        {
            "tenant_id": "acme",
            "budget_usd": 0.02,
            "spent_usd": 0.024,
            "left_usd": 0.0,
            "exhausted": True,
            "workflows": 3,
            "cost_usd": 0.024,
        },
        {
            "tenant_id": "globex",
            "budget_usd": None,
            "spent_usd": None,
            "left_usd": None,
            "exhausted": False,
            "workflows": 1,
            "cost_usd": 0.012,
        },
    ]
    table = run_cli("budget", "show", "--tenant", "acme", env=cli_env)
    assert "exhausted" in table.stdout and "globex" not in table.stdout

    assert run_cli("budget", "clear", "--tenant", "acme", env=cli_env).returncode == 0
    [again] = await _run(rt, ("plan_write", "acme"))
    assert (await client.get(again)).status is WorkflowStatus.COMPLETED


async def test_a_step_in_flight_overruns_by_at_most_its_own_last_call(
    rt: Runtime, model: ScriptedModel
) -> None:
    budget = await rt.store.costs.set_budget("initech", Decimal("0.005"))
    assert (budget.usd, budget.spent_usd) == (Decimal("0.005"), 0)
    [wid] = await _run(rt, ("spend", "initech"))  # two $0.012 calls in one step
    record = await Client(rt).get(wid)
    assert record.status is WorkflowStatus.FAILED and "BudgetExceeded" in (record.error or "")
    assert len(model.calls) == 1  # the first call was under budget; the second never left
    [spent] = await rt.store.costs.budgets("initech")
    assert spent.spent_usd == WRITE_USD and spent.exhausted  # the failed attempt's call counts
    [attempt] = await fetch(rt, "SELECT model_calls, cost_usd FROM step_attempts")
    assert tuple(attempt) == (1, WRITE_USD)


async def test_budget_rows_are_tenant_scoped(rt: Runtime) -> None:
    await rt.store.costs.set_budget("red", Decimal(5))
    await rt.store.costs.set_budget("blue", Decimal(7))
    async with owner_connection(rt) as conn:
        forced = await conn.fetchrow(
            "SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relname = 'tenant_budgets' AND relnamespace = current_schema()::regnamespace"
        )
        assert forced is not None and tuple(forced) == (True, True)
        # As the application role without the engine's scope: only the tenant's own row.
        await conn.execute("SELECT set_config('role', 'orchestrator_app', false)")
        async with tenancy.scoped(conn, "red"):
            seen = await conn.fetch("SELECT tenant_id, usd FROM tenant_budgets")
        assert [tuple(r) for r in seen] == [("red", 5)]
        assert await conn.fetchval("SELECT count(*) FROM tenant_budgets") == 0


async def test_budget_command_errors(cli_env: dict[str, str]) -> None:
    assert run_cli("migrate", env=cli_env).returncode == 0
    assert_one_line_error(
        run_cli("budget", "set", "--tenant", "acme", "--usd", "lots", env=cli_env),
        "not an amount of USD: 'lots'",
    )
    assert_one_line_error(
        run_cli("budget", "set", "--tenant", "acme", "--usd", "-3", env=cli_env),
        "a budget is zero or more USD",
    )
    assert_one_line_error(
        run_cli("budget", "clear", "--tenant", "nobody", env=cli_env), "has no budget"
    )


async def test_the_offline_model_costs_nothing_and_no_budget_stops_it(support: Runtime) -> None:
    await support.store.costs.set_budget("acme", Decimal(0))  # spent from the start
    client = Client(support)
    tickets = [t for t in support_app.sample_tickets() if t.tenant_id == "acme"][:2]
    ids = [await client.submit("support", t) for t in tickets]
    await Worker(support, concurrency=2, reconcile=False).run_until_idle(timeout=60)
    for wid in ids:
        assert (await client.get(wid)).status in (WorkflowStatus.COMPLETED, WorkflowStatus.WAITING)
    attempts = await fetch(support, "SELECT model, model_calls, cost_usd FROM step_attempts")
    assert {a["model"] for a in attempts if a["model_calls"]} == {OFFLINE_MODEL_NAME}
    assert {a["cost_usd"] for a in attempts} == {0}
    assert {r["cost_usd"] for r in await fetch(support, "SELECT cost_usd FROM workflows")} == {0}


def test_prices_defaults_overrides_snapshots_and_unknown_models(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = Pricing()
    assert default.cost("gpt-4o-mini", Usage(1_000_000, 1_000_000)) == Decimal("0.75")
    assert default.cost("gpt-4o-mini-2024-07-18", Usage(2_000, 0)) == Decimal("0.0003")
    assert default.cost(OFFLINE_MODEL_NAME, Usage(10**9, 10**9)) == 0
    assert default.cost(None, Usage(5, 5)) == 0

    monkeypatch.setenv(
        "ORCHESTRATOR_MODEL_PRICES",
        '{"gpt-4o-mini": {"input": 1, "output": 2}, "local-llama": {"input": 0.5, "output": 0}}',
    )
    table = Settings().model_prices
    assert table["local-llama"] == ModelPrice(input=Decimal("0.5"), output=Decimal(0))
    custom = Pricing(table)
    assert custom.cost("gpt-4o-mini", Usage(500_000, 250_000)) == Decimal("1.0")
    assert custom.cost("local-llama", Usage(2_000_000, 9)) == Decimal(1)
    assert custom.cost("gpt-4o", Usage(1_000_000, 0)) == Decimal("2.50")  # defaults kept

    with caplog.at_level(logging.WARNING, logger="orchestrator.cost"):
        assert custom.cost("mystery-model", Usage(100, 100)) == 0
        assert custom.cost("mystery-model", Usage(100, 100)) == 0
    warned = [r.getMessage() for r in caplog.records if "mystery-model" in r.getMessage()]
    assert len(warned) == 1 and "ORCHESTRATOR_MODEL_PRICES" in warned[0]
