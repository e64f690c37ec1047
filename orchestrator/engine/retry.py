"""Retry timing: exponential backoff with full jitter (AWS architecture blog's variant)."""

from __future__ import annotations

import random


def backoff(attempt: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt ``attempt + 1``: uniform in [base, min(cap, base * 2^n)].

    Jitter spreads retries of many failing steps so they do not return in a herd.
    """
    ceiling = min(cap, base * (2 ** max(0, attempt - 1)))
    return (rng or random).uniform(base, max(base, ceiling))
