"""Model cost per step and per tenant.

A step attempt's cost is written with the attempt and added to its workflow's
``cost_usd`` in the same statement (``store.steps``); a step's cost is its attempts
summed, a tenant's the sum over its workflows (``tenant_costs``: a query for
reports, never run per step).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from uuid import UUID

from orchestrator.store import Conn

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
class TenantCost:
    """What a tenant's workflows cost in model calls, in total (USD)."""

    tenant_id: str
    workflows: int
    cost_usd: Decimal


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
    """Model costs per step and tenant, each operation on a pooled connection."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

    async def step_costs(self, workflow_id: UUID) -> list[tuple[int, str, Decimal]]:
        """What each step of a workflow cost: (seq, agent, USD) in order."""
        async with self._connect() as conn:
            return await step_costs(conn, workflow_id)

    async def tenant_costs(self, tenant_id: str | None = None) -> list[TenantCost]:
        """Model cost per tenant, of every tenant or of one."""
        async with self._connect() as conn:
            return await tenant_costs(conn, tenant_id)
