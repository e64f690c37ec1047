"""The one event writer: audit events of a workflow (or one of its steps), in a batch.

(Single-statement writes, the completion and the submission among them, insert their
events inside their own statement.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from orchestrator.schemas import EventType
from orchestrator.store import Conn

INSERT_EVENTS = """
INSERT INTO events (workflow_id, step_id, type, data)
SELECT $1, $2, t, d::jsonb FROM unnest($3::text[], $4::text[]) AS x(t, d)
"""


async def record(
    conn: Conn,
    workflow_id: UUID,
    step_id: UUID | None,
    events: Sequence[tuple[EventType, dict[str, Any]]],
) -> None:
    """Append ``events`` (type, data) to the workflow's audit trail, in order."""
    if not events:
        return
    await conn.execute(
        INSERT_EVENTS,
        workflow_id,
        step_id,
        [t.value for t, _ in events],
        [json.dumps(d) for _, d in events],
    )
