"""``orchestrator budget``: set, show and clear per-tenant model budgets (USD).

With its budget spent, a tenant's steps make no more model calls: the call raises
``BudgetExceeded`` and the step fails, not retried (``orchestrator.step.budget``).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator.cli.render import usd
from orchestrator.cli.support import guard, out, run_body
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.store.costs import Budget, TenantCost

budget = typer.Typer(help="Per-tenant model budgets (USD): set, show, clear.")


@budget.command("set")
@guard
def budget_set(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="the tenant")],
    amount: Annotated[str, typer.Option("--usd", help="the budget in USD, e.g. 50 or 12.5")],
) -> None:
    """Set a tenant's model budget. The first time, its spend starts at what its workflows
    cost so far."""
    value = _amount(amount)

    async def body(runtime: Runtime) -> None:
        b = await runtime.store.costs.set_budget(tenant, value)
        out.print(
            f"budget of tenant {b.tenant_id}: {usd(b.usd)} "
            f"(spent {usd(b.spent_usd)}, {usd(b.left_usd)} left)",
            highlight=False,
            markup=False,
        )

    run_body(ctx.find_root().obj, body, migrate=False)


@budget.command("show")
@guard
def budget_show(
    ctx: typer.Context,
    tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show tenants' budgets, spend and total model cost (tenants with a budget or a cost)."""

    async def body(runtime: Runtime) -> None:
        costs = runtime.store.costs
        rows = _rows(await costs.budgets(tenant), await costs.tenant_costs(tenant))
        if as_json:
            out.print_json(data=rows)
            return
        table = Table("tenant", "budget", "spent", "left", "workflows", "total cost")
        for r in rows:
            limited = r["budget_usd"] is not None
            table.add_row(
                r["tenant_id"],
                usd(r["budget_usd"]) if limited else "none",
                usd(r["spent_usd"]) if limited else "",
                ("exhausted" if r["exhausted"] else usd(r["left_usd"])) if limited else "",
                str(r["workflows"]),
                usd(r["cost_usd"]),
            )
        out.print(table)

    run_body(ctx.find_root().obj, body, migrate=False)


@budget.command("clear")
@guard
def budget_clear(
    ctx: typer.Context, tenant: Annotated[str, typer.Option("--tenant", help="the tenant")]
) -> None:
    """Remove a tenant's budget: its model calls are no longer limited."""

    async def body(runtime: Runtime) -> None:
        if not await runtime.store.costs.clear_budget(tenant):
            raise InvalidInput(f"tenant {tenant!r} has no budget")
        out.print(f"budget of tenant {tenant} removed", highlight=False, markup=False)

    run_body(ctx.find_root().obj, body, migrate=False)


def _amount(text: str) -> Decimal:
    try:
        value = Decimal(text.strip().removeprefix("$"))
    except InvalidOperation:
        raise InvalidInput(f"not an amount of USD: {text!r} (e.g. 50 or 12.5)") from None
    if not value.is_finite() or value < 0:
        raise InvalidInput(f"a budget is zero or more USD, not {text!r}")
    return value


def _rows(budgets: list[Budget], costs: list[TenantCost]) -> list[dict[str, Any]]:
    """One row per tenant (the JSON shape of ``budget show --json``): amounts in USD as
    numbers, the budget's fields null for a tenant without one."""
    by_tenant = {b.tenant_id: b for b in budgets}
    spent = {c.tenant_id: c for c in costs}
    rows = []
    for name in sorted({*by_tenant, *spent}):
        b, c = by_tenant.get(name), spent.get(name)
        rows.append(
            {
                "tenant_id": name,
                "budget_usd": float(b.usd) if b else None,
                "spent_usd": float(b.spent_usd) if b else None,
                "left_usd": float(b.left_usd) if b else None,
                "exhausted": b.exhausted if b else False,
                "workflows": c.workflows if c else 0,
                "cost_usd": float(c.cost_usd) if c else 0.0,
            }
        )
    return rows
