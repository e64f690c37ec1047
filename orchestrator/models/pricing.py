"""What model calls cost: a price table (USD per million tokens) and the cost of a usage.

The defaults are OpenAI's list prices for common models (uncached input; a cached
prompt is counted at the full price, so a figure here is an upper bound) and 0 for
the offline model. ``ORCHESTRATOR_MODEL_PRICES`` adds models or replaces defaults.
A model in neither table costs 0, and the runtime says so once per model name.
Costs are exact decimals: summed over millions of calls they never drift.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from decimal import Decimal

from orchestrator.models.llm import OFFLINE_MODEL_NAME, Usage
from orchestrator.settings import ModelPrice

log = logging.getLogger("orchestrator.cost")

PER_TOKENS = Decimal(1_000_000)
ZERO = Decimal(0)


def _price(input_usd: str, output_usd: str) -> ModelPrice:
    return ModelPrice(input=Decimal(input_usd), output=Decimal(output_usd))


# USD per million tokens (input, output), OpenAI's published list prices.
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    OFFLINE_MODEL_NAME: _price("0", "0"),
    "gpt-5": _price("1.25", "10.00"),
    "gpt-5-mini": _price("0.25", "2.00"),
    "gpt-5-nano": _price("0.05", "0.40"),
    "gpt-4.1": _price("2.00", "8.00"),
    "gpt-4.1-mini": _price("0.40", "1.60"),
    "gpt-4.1-nano": _price("0.10", "0.40"),
    "gpt-4o": _price("2.50", "10.00"),
    "gpt-4o-mini": _price("0.15", "0.60"),
    "o1": _price("15.00", "60.00"),
    "o3": _price("2.00", "8.00"),
    "o3-mini": _price("1.10", "4.40"),
    "o4-mini": _price("1.10", "4.40"),
    "gpt-4-turbo": _price("10.00", "30.00"),
    "gpt-3.5-turbo": _price("0.50", "1.50"),
}
# A dated snapshot ("gpt-4o-mini-2024-07-18") is priced as its model.
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")


class Pricing:
    """The price table: ``DEFAULT_PRICES`` with ``overrides`` (the ``model_prices``
    setting) on top."""

    def __init__(self, overrides: Mapping[str, ModelPrice] | None = None) -> None:
        self.prices: dict[str, ModelPrice] = {**DEFAULT_PRICES, **(overrides or {})}
        self._unknown: set[str] = set()

    def price(self, model: str) -> ModelPrice | None:
        """The price of ``model`` (or of the model a dated snapshot name belongs to)."""
        found = self.prices.get(model)
        if found is None:
            found = self.prices.get(_SNAPSHOT.sub("", model))
        return found

    def cost(self, model: str | None, usage: Usage) -> Decimal:
        """What ``usage`` of ``model`` costs in USD; 0 for no model or an unknown one
        (logged once per name)."""
        if model is None or (usage.prompt_tokens == 0 and usage.completion_tokens == 0):
            return ZERO
        price = self.price(model)
        if price is None:
            if model not in self._unknown:
                self._unknown.add(model)
                log.warning(
                    "model %r has no price: its calls are recorded at cost 0 "
                    "(set ORCHESTRATOR_MODEL_PRICES, USD per million tokens)",
                    model,
                )
            return ZERO
        spent = usage.prompt_tokens * price.input + usage.completion_tokens * price.output
        return spent / PER_TOKENS
