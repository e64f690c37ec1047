"""The consolidation queue: completed workflows to distil into long-term memory.

(Skeleton: filled in by the consolidation work of issue 9.)
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from orchestrator.coordination.keys import Keys


def enqueue_in(pipe: Any, keys: Keys, workflow_id: UUID) -> None:
    """Add the workflow to the consolidation stream, in the handoff's pipeline."""
