"""``ctx.memory``: the session's working memory, its transcript, and recall.

(Skeleton: filled in by the working-memory work of issue 9.)
"""

from __future__ import annotations

from typing import Any

from orchestrator.step.info import StepInfo
from orchestrator.step.services import StepServices


class SessionMemory:
    """What a step remembers of its session and customer (see the module docstring)."""

    def __init__(self, services: StepServices, info: StepInfo) -> None:
        self._services = services
        self.info = info

    def append_in(self, pipe: Any) -> None:
        """Add this step's working-memory update to the handoff's Redis pipeline."""
