"""Durable timers: wake the steps whose sleep ended or whose wait timed out.

The due time lives in Postgres (``steps.not_before`` of a waiting step), so a
timer survives restarts and the loss of Redis. Every worker runs this about
once a second; row locks (SKIP LOCKED) let several workers wake different
steps, and each wake raises the step's fence, so a duplicate wake-up is
harmless. A wake whose enqueue is lost (Redis down) is a queued step without
an envelope: the reconciler re-enqueues it.
"""

from __future__ import annotations

from orchestrator.connections import redis_errors
from orchestrator.coordination import streams
from orchestrator.runtime import Runtime


async def wake_due(rt: Runtime, *, limit: int = 100) -> int:
    """Wake due timers and enqueue their steps; return how many woke."""
    woken = await rt.store.wake_due(limit=limit)
    with redis_errors():
        for envelope in woken:
            await streams.enqueue(rt.redis, rt.keys, envelope)
    return len(woken)
