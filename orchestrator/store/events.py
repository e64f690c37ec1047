"""The one event writer: audit events of a workflow (or one of its steps), in a batch.

(Single-statement writes, the completion and the submission among them, insert their
events inside their own statement.)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from orchestrator.schemas import Event, EventType
from orchestrator.store import Conn

INSERT_EVENTS = """
INSERT INTO events (workflow_id, step_id, type, data)
SELECT $1, $2, t, d::jsonb FROM unnest($3::text[], $4::text[]) AS x(t, d)
"""

SELECT_AFTER = """
SELECT id, workflow_id, step_id, type, data, created_at FROM events
WHERE workflow_id = $1 AND id > $2 ORDER BY id LIMIT $3
"""


async def after(conn: Conn, workflow_id: UUID, after_id: int, limit: int) -> list[Event]:
    """The workflow's events after the one numbered ``after_id``, oldest first."""
    rows = await conn.fetch(SELECT_AFTER, workflow_id, after_id, limit)
    return [Event(**{**dict(r), "type": EventType(r["type"])}) for r in rows]


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
