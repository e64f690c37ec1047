"""A tenant's model budget as one step execution sees it (no Postgres on the hot path).

The step's open read (the one read before a step runs) brings the tenant's budget
and what it had spent when the step opened. Each model call of the step is checked
against that, less what this execution's own calls cost so far: with the budget
spent, the call raises ``BudgetExceeded`` (never retried) instead of reaching the
model. So a budget may be overrun, by the last call of a step (its cost is known
only after it), and by steps of the same tenant running at the same moment (each
checked against the spend committed when it opened). A model that costs nothing
(the offline one, or one missing from the price table) is never stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from orchestrator.errors import BudgetExceeded
from orchestrator.models.llm import Usage


@dataclass(frozen=True, slots=True)
class StepBudget:
    """The tenant's budget (USD), what it had spent when the step opened, and the price
    of this step's model usage."""

    tenant_id: str
    budget_usd: Decimal
    spent_usd: Decimal
    cost: Callable[[Usage], Decimal]

    def check(self, usage: Usage) -> None:
        """Raise ``BudgetExceeded`` when the spend, with this execution's ``usage`` so far,
        has reached the budget. A model that costs nothing (the offline one) is never
        stopped: a budget limits spending."""
        spent = self.spent_usd + self.cost(usage)
        if spent >= self.budget_usd and self.cost(_ONE_EACH) > 0:
            raise BudgetExceeded(self.tenant_id, budget_usd=self.budget_usd, spent_usd=spent)


_ONE_EACH = Usage(1, 1)  # a probe of the model's price: zero only for a free model
