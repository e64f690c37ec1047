"""Open reads known without reading: the statement that created a step just wrote them.

A submission (``workflows.CREATE_WORKFLOW``) creates the first step, and a linear
completion (``steps.COMPLETE_STEP``) its workflow's next one, in the statement
that also sets everything that step's open read (``steps.SELECT_OPEN``) returns:
the step is queued at attempt 1 with no tool runs, waits or signals, the
workflow runs with the step number it was given, and the tenant, session and
customer are known. So when the same process takes that step a moment later
(a worker in the client's process, or the worker that handed it on), the read
can be skipped: one Postgres statement per step.

Safe because nothing here is trusted for safety: every write of the run
(tool-ledger rows, completion, failure, park) is still fenced on the step being
queued at the envelope's attempt. What a read would have added is only an
earlier "skip": a workflow cancelled, or a step requeued, in the moments
between the handoff and the run. Then the run writes nothing, as it would if
the cancel had come just after a read. A step is taken once, at the attempt it
was created with, and only within ``seconds`` of its commit; a tenant with a
budget is never read ahead (its spend moves with every other workflow's).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from uuid import UUID

from orchestrator.store.steps import OpenStep

if TYPE_CHECKING:
    from orchestrator.schemas import TaskEnvelope

LIMIT = 10_000  # steps remembered at most: those another process took are never taken here


class ReadAhead:
    """The open reads of steps this process just created, each kept ``seconds``, taken once."""

    def __init__(self, seconds: float, *, limit: int = LIMIT) -> None:
        self.seconds = seconds
        self._limit = limit
        # In insertion order, so in expiry order: the oldest go first.
        self._known: dict[UUID, tuple[float, int, OpenStep]] = {}
        self.taken = 0  # open reads skipped

    def put(self, envelope: TaskEnvelope, opened: OpenStep) -> None:
        """What ``envelope``'s open read returns as of now (the step was just committed)."""
        if self.seconds <= 0:
            return
        now = time.monotonic()
        known = self._known
        while known:  # the expired, and the oldest beyond the limit: in order, at the front
            oldest = next(iter(known))
            if known[oldest][0] > now and len(known) < self._limit:
                break
            del known[oldest]
        known[envelope.step_id] = (now + self.seconds, envelope.attempt, opened)

    def take(self, envelope: TaskEnvelope) -> OpenStep | None:
        """The open read of ``envelope``'s step, if this process created it at this attempt
        within ``seconds``; None: read it."""
        found = self._known.pop(envelope.step_id, None)
        if found is None:
            return None
        until, attempt, opened = found
        if attempt != envelope.attempt or time.monotonic() >= until:
            return None
        self.taken += 1
        return opened

    def __len__(self) -> int:
        return len(self._known)
