"""Group commit for concurrent callers: calls that meet share one round trip.

A ``Combiner`` wraps a function that handles a batch (a pipelined Postgres
statement, one Redis pipeline). Each caller hands in one item and gets its own
result back; while a batch is in flight, the calls that arrive queue up and the
next caller to get a turn sends them all at once. One caller alone is sent at
once, so latency one at a time is unchanged; under load, round trips, commits
and syscalls are shared (the same idea as Postgres's group commit and
redis-py-cluster's auto-pipelining).

A batch's own failure (an exception from the batch function) is every member's
failure: the batch function decides what may fail alone (the store re-runs a
failed Postgres batch one item at a time). A batch in flight finishes even if
the caller that sent it is cancelled: its members did not ask to be cancelled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import anyio

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(slots=True)
class _Slot(Generic[Item, Result]):
    item: Item
    done: bool = False
    result: Result | None = None
    error: BaseException | None = None
    # Set when its batch ended, or when its turn to send came: each caller wakes for its
    # own reasons only (one Event for all woke every waiter at every batch's end).
    woken: anyio.Event | None = None


class Combiner(Generic[Item, Result]):
    """Runs ``handle`` over the items of concurrent calls, ``max_batch`` at a time and at
    most ``in_flight`` batches at once; ``handle`` returns one result per item, in order."""

    def __init__(
        self,
        handle: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int = 64,
        in_flight: int = 1,
    ) -> None:
        self._handle = handle
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._sending = 0  # batches in flight
        self._queue: list[_Slot[Item, Result]] = []

    async def __call__(self, item: Item) -> Result:
        slot: _Slot[Item, Result] = _Slot(item)
        self._queue.append(slot)
        try:
            while not slot.done:  # not taken by the batches before: send the next, or wait
                if self._sending < self._in_flight:
                    await self._send_next()
                else:
                    slot.woken = anyio.Event()
                    await slot.woken.wait()
        except BaseException:
            if slot in self._queue:  # cancelled before anyone sent it: it never runs
                self._queue.remove(slot)
                self._pass_turn()  # it may have been woken to send: the next in line does
            raise
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with done, from handle

    async def _send_next(self) -> None:
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        self._sending += 1
        self._pass_turn()  # more than one batch may be in flight: the next in line sends
        try:
            await self._send(batch)
        finally:
            self._sending -= 1
            for member in batch:
                if member.woken is not None:
                    member.woken.set()
            self._pass_turn()

    def _pass_turn(self) -> None:
        """Wake the first caller in line if a batch may be sent now: it sends the next."""
        if self._queue and self._sending < self._in_flight:
            head = self._queue[0].woken
            if head is not None:
                head.set()

    async def _send(self, batch: list[_Slot[Item, Result]]) -> None:
        # Shielded: the members wait for this batch; a timeout inside ``handle`` bounds it.
        with anyio.CancelScope(shield=True):
            try:
                results = list(await self._handle([s.item for s in batch]))
                if len(results) != len(batch):
                    raise RuntimeError(f"a batch of {len(batch)} got {len(results)} results")
            except BaseException as exc:
                for s in batch:
                    s.error, s.done = exc, True
                if not isinstance(exc, Exception):
                    raise
                return
        for s, result in zip(batch, results, strict=True):
            s.result, s.done = result, True
