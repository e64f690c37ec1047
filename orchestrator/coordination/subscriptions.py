"""Pub/Sub connections kept subscribed between waits.

``Client.wait`` listens for workflow signals. Opening a Pub/Sub connection per
call cost a TCP connect, HELLO, two CLIENT SETINFO and a SUBSCRIBE before the
first wait could start. A connection given back stays subscribed and is taken by
the next wait on the same channels within ``IDLE_SECONDS``; what it buffered
meanwhile is a nudge only (the waiter checks Postgres), and one idle longer is
closed rather than drained (a busy deployment keeps publishing to it).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.asyncio as aioredis

IDLE_SECONDS = 5.0  # how long a given-back subscription is kept for the next wait
# Given-back subscriptions kept per channel set: a burst of concurrent waits must not
# leave a connection each, subscribed and buffering, until the runtime closes.
MAX_IDLE = 8


class Subscriptions:
    """Subscribed Pub/Sub connections of one runtime, reused by successive waits."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._idle: dict[tuple[str, ...], list[tuple[Any, float]]] = {}

    @contextlib.asynccontextmanager
    async def subscribed(self, channels: Sequence[str]) -> AsyncIterator[Any]:
        """A Pub/Sub subscribed to ``channels`` (taken back if the block ends cleanly)."""
        key = tuple(channels)
        pubsub = await self._take(key)
        try:
            yield pubsub
        except BaseException:
            await self._close(pubsub)
            raise
        kept = self._idle.setdefault(key, [])
        if len(kept) < MAX_IDLE:
            kept.append((pubsub, time.monotonic()))
        else:
            await self._close(pubsub)

    async def _take(self, key: tuple[str, ...]) -> Any:
        now, idle = time.monotonic(), self._idle.get(key, [])
        stale = [p for p, since in idle if now - since >= IDLE_SECONDS]
        idle[:] = [(p, since) for p, since in idle if now - since < IDLE_SECONDS]
        for pubsub in stale:
            await self._close(pubsub)
        if idle:
            return idle.pop()[0]
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(*key)
        except BaseException:
            await self._close(pubsub)
            raise
        return pubsub

    async def aclose(self) -> None:
        """Close every kept subscription (the runtime is closing)."""
        idle, self._idle = self._idle, {}
        for kept in idle.values():
            for pubsub, _ in kept:
                await self._close(pubsub)

    @staticmethod
    async def _close(pubsub: Any) -> None:
        with contextlib.suppress(Exception):
            await pubsub.aclose()
