"""The Python API for submitting tickets and following workflows."""

from __future__ import annotations

import math
from collections.abc import Iterable
from uuid import UUID

import anyio

from orchestrator import streams
from orchestrator.runtime import Runtime
from orchestrator.store import workflows
from schemas import Ticket, WorkflowRecord, WorkflowStatus


class Client:
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def submit(self, ticket: Ticket, *, pipeline: str | None = None) -> UUID:
        """Record the workflow in Postgres (the commit is the acceptance), then enqueue it."""
        name, agents = self.rt.app.resolve_pipeline(pipeline)
        async with self.rt.pool.acquire() as conn:
            envelope = await workflows.create(
                conn,
                ticket,
                pipeline=name,
                first_agent=agents[0],
                app_version=self.rt.app.version,
            )
        await streams.enqueue(self.rt.redis, self.rt.keys, envelope)
        return envelope.workflow_id

    async def get(self, workflow_id: UUID) -> WorkflowRecord:
        async with self.rt.pool.acquire() as conn:
            return await workflows.get(conn, workflow_id)

    async def wait(
        self, workflow_ids: Iterable[UUID], *, timeout: float | None = None, poll: float = 0.25
    ) -> dict[UUID, WorkflowStatus]:
        """Wait until every workflow is terminal; Postgres decides, Pub/Sub only wakes us early."""
        pending = set(workflow_ids)
        result: dict[UUID, WorkflowStatus] = {}
        pubsub = self.rt.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.rt.keys.signal_channel())
        try:
            with anyio.fail_after(timeout if timeout is not None else math.inf):
                while pending:
                    async with self.rt.pool.acquire() as conn:
                        current = await workflows.statuses(conn, list(pending))
                    for wid, st in current.items():
                        if st.terminal:
                            result[wid] = st
                            pending.discard(wid)
                    if pending:
                        # Any signal (or the poll interval) triggers the next Postgres check.
                        await pubsub.get_message(timeout=poll)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        return result
