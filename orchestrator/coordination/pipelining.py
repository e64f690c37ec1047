"""Concurrent callers' Redis commands share one pipeline: one round trip for all.

Each caller hands in a function that queues its commands on a pipeline and gets
back its own replies. Calls that arrive while a pipeline is in flight go in the
next one (``orchestrator.batching``); one call alone is sent at once. Not a
transaction: as before batching, each caller's commands are independent of the
others', and an error reply (a command refused) is raised to its caller only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from orchestrator.batching import Combiner

Fill = Callable[[Any], None]  # queues one caller's commands on the pipeline it is given
MAX_BATCH = 128  # callers per pipeline


class Pipelined:
    """Sends the commands of concurrent callers in shared pipelines."""

    def __init__(self, client: aioredis.Redis, *, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self._combiner: Combiner[Fill, list[Any]] = Combiner(self._send, max_batch=max_batch)

    async def __call__(self, fill: Fill) -> list[Any]:
        """Run ``fill``'s commands; their replies, in order. A refused command raises its
        error here (the other callers' commands are unaffected)."""
        replies = await self._combiner(fill)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

    async def _send(self, fills: Sequence[Fill]) -> list[list[Any]]:
        pipe = self.client.pipeline(transaction=False)
        bounds = []
        for fill in fills:
            start = len(pipe)
            fill(pipe)
            bounds.append((start, len(pipe)))
        replies = await pipe.execute(raise_on_error=False)
        return [replies[a:b] for a, b in bounds]
