"""Named crash points for fault-injection tests (``ORCHESTRATOR_CRASH_AT``).

A worker started with ``ORCHESTRATOR_CRASH_AT=after_commit`` kills itself with
SIGKILL the ``ORCHESTRATOR_CRASH_AFTER``-th time it reaches that point, the way
a power cut or OOM kill would. Unset (the default), every check is a no-op.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

POINTS = frozenset({"after_claim", "after_tool_effect", "after_commit", "after_xadd"})


class CrashPoints:
    """SIGKILLs this process the ``after``-th time it reaches the crash point ``at``;
    with ``at=None`` every check is a no-op. An unknown point raises ValueError."""

    def __init__(self, at: str | None, after: int) -> None:
        if at is not None and at not in POINTS:
            raise ValueError(f"unknown crash point {at!r}; known: {', '.join(sorted(POINTS))}")
        self.at = at
        self.after = after
        self._seen: Counter[str] = Counter()

    def reached(self, point: str) -> None:
        """Count a visit to ``point``; SIGKILL this process if it is the armed one and the
        count has reached ``after``. Does not return in that case."""
        if self.at != point:
            return
        self._seen[point] += 1
        if self._seen[point] >= self.after:
            os.kill(os.getpid(), signal.SIGKILL)
