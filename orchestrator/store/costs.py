"""Model cost per tenant, and the optional per-tenant budgets (``orchestrator budget``).

A step attempt's cost is written with the attempt and added to its workflow's
``cost_usd`` in the same statement (``store.steps``); a tenant's cost is the sum
over its workflows (``tenant_costs``, a query for reports, never run per step).
A tenant with a budget also has a running spend (``tenant_budgets.spent_usd``),
kept by those same statements, which the step's open read compares with the
budget. Setting a budget for the first time starts the spend at what the tenant's
workflows cost so far; setting it again changes the amount only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from orchestrator.errors import InvalidInput
from orchestrator.store import Conn, tenancy

# The tenant is set on the transaction (tenancy.scoped) and repeated in the WHERE clauses,
# so the engine scope (which sees every tenant) cannot widen them.
SET_BUDGET = """
INSERT INTO tenant_budgets (tenant_id, usd, spent_usd)
SELECT $1, $2, coalesce(sum(cost_usd), 0) FROM workflows WHERE tenant_id = $1
ON CONFLICT (tenant_id) DO UPDATE SET usd = excluded.usd, updated_at = now()
RETURNING tenant_id, usd, spent_usd, updated_at
"""
CLEAR_BUDGET = "DELETE FROM tenant_budgets WHERE tenant_id = $1 RETURNING tenant_id"
BUDGETS = """
SELECT tenant_id, usd, spent_usd, updated_at FROM tenant_budgets
WHERE $1::text IS NULL OR tenant_id = $1
ORDER BY tenant_id
"""
# Per step: its attempts summed (a finished workflow's attempts go when it is pruned).
STEP_COSTS = """
SELECT s.seq, s.agent, coalesce(sum(a.cost_usd), 0) AS cost_usd
FROM steps s LEFT JOIN step_attempts a ON a.step_id = s.id
WHERE s.workflow_id = $1
GROUP BY s.id ORDER BY s.seq
"""
TENANT_COSTS = """
SELECT tenant_id, count(*) AS workflows, sum(cost_usd) AS cost_usd FROM workflows
WHERE $1::text IS NULL OR tenant_id = $1
GROUP BY tenant_id ORDER BY tenant_id
"""


@dataclass(frozen=True, slots=True)
class Budget:
    """A tenant's model budget (USD) and what it has spent against it."""

    tenant_id: str
    usd: Decimal
    spent_usd: Decimal
    updated_at: datetime

    @property
    def left_usd(self) -> Decimal:
        """What remains (never below zero)."""
        return max(self.usd - self.spent_usd, Decimal(0))

    @property
    def exhausted(self) -> bool:
        """Whether the tenant's steps may make no more model calls."""
        return self.spent_usd >= self.usd


@dataclass(frozen=True, slots=True)
class TenantCost:
    """What a tenant's workflows cost in model calls, in total (USD)."""

    tenant_id: str
    workflows: int
    cost_usd: Decimal


def _budget(row: Any) -> Budget:
    return Budget(row["tenant_id"], row["usd"], row["spent_usd"], row["updated_at"])


async def set_budget(conn: Conn, tenant_id: str, usd: Decimal) -> Budget:
    """Set ``tenant_id``'s budget to ``usd``; returns it with the spend so far."""
    if not tenant_id.strip():
        raise InvalidInput("the budget needs a tenant")
    if not usd.is_finite() or usd < 0:
        raise InvalidInput(f"a budget is a number of USD, zero or more (not {usd})")
    async with tenancy.scoped(conn, tenant_id):
        return _budget(await conn.fetchrow(SET_BUDGET, tenant_id, usd))


async def clear_budget(conn: Conn, tenant_id: str) -> bool:
    """Remove ``tenant_id``'s budget (no limit any more); False when it had none."""
    async with tenancy.scoped(conn, tenant_id):
        return await conn.fetchval(CLEAR_BUDGET, tenant_id) is not None


async def budgets(conn: Conn, tenant_id: str | None = None) -> list[Budget]:
    """Every tenant's budget, or ``tenant_id``'s only."""
    return [_budget(r) for r in await conn.fetch(BUDGETS, tenant_id)]


async def step_costs(conn: Conn, workflow_id: UUID) -> list[tuple[int, str, Decimal]]:
    """What each step of a workflow cost, its attempts summed: (seq, agent, USD) in order."""
    rows = await conn.fetch(STEP_COSTS, workflow_id)
    return [(r["seq"], r["agent"], r["cost_usd"]) for r in rows]


async def tenant_costs(conn: Conn, tenant_id: str | None = None) -> list[TenantCost]:
    """What every tenant's workflows cost (or ``tenant_id``'s only), by tenant."""
    rows = await conn.fetch(TENANT_COSTS, tenant_id)
    return [TenantCost(r["tenant_id"], r["workflows"], r["cost_usd"]) for r in rows]


Connect = Callable[[], contextlib.AbstractAsyncContextManager[Conn]]


class CostStore:
    """Tenants' model costs and budgets, each operation on a pooled connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def set_budget(self, tenant_id: str, usd: Decimal) -> Budget:
        """Set a tenant's budget (see ``set_budget``)."""
        async with self._connect() as conn:
            return await set_budget(conn, tenant_id, usd)

    async def clear_budget(self, tenant_id: str) -> bool:
        """Remove a tenant's budget; False when it had none."""
        async with self._connect() as conn:
            return await clear_budget(conn, tenant_id)

    async def budgets(self, tenant_id: str | None = None) -> list[Budget]:
        """Budgets, of every tenant or of one."""
        async with self._connect() as conn:
            return await budgets(conn, tenant_id)

    async def step_costs(self, workflow_id: UUID) -> list[tuple[int, str, Decimal]]:
        """What each step of a workflow cost: (seq, agent, USD) in order."""
        async with self._connect() as conn:
            return await step_costs(conn, workflow_id)

    async def tenant_costs(self, tenant_id: str | None = None) -> list[TenantCost]:
        """Model cost per tenant, of every tenant or of one."""
        async with self._connect() as conn:
            return await tenant_costs(conn, tenant_id)
