"""The combiner behind group commit: concurrent calls share batches, each gets its own
result, a batch's failure is each member's, a caller cancelled before its batch is sent
is dropped, and a batch in flight finishes even when the caller sending it is cancelled."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import anyio.lowlevel
import pytest

from orchestrator.batching import Combiner

pytestmark = pytest.mark.anyio


class Recorder:
    """A batch function that doubles its items, records each batch, and can be held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = anyio.Event()
        self.hold = False
        self.fail_on: int | None = None
        self.on_release: Callable[[], None] = lambda: None

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await anyio.lowlevel.checkpoint()  # a round trip yields to the event loop
        if self.hold:
            await self.release.wait()
            self.on_release()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


async def _behind_one_in_flight(
    call: Callable[[int], Awaitable[None]], calls: int, handle: Recorder
) -> None:
    """``call(0)`` goes out alone and is held in flight; ``call(1)`` to ``call(calls - 1)``
    arrive meanwhile; then the held batch is released and every call is waited for."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)
        await anyio.wait_all_tasks_blocked()  # [0] is in flight
        for i in range(1, calls):
            tg.start_soon(call, i)
        await anyio.wait_all_tasks_blocked()
        handle.release.set()


async def test_one_call_alone_is_sent_at_once() -> None:
    handle = Recorder()
    assert await Combiner(handle)(21) == 42
    assert handle.batches == [[21]]


async def test_calls_made_together_go_in_two_batches_the_first_alone() -> None:
    handle = Recorder()
    combine: Combiner[int, int] = Combiner(handle)
    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(combine, i)
    assert handle.batches == [[0], [1, 2, 3, 4]]


async def test_calls_arriving_while_a_batch_is_in_flight_share_the_next_batch() -> None:
    handle = Recorder()
    handle.hold = True
    combine: Combiner[int, int] = Combiner(handle, max_batch=3)
    results: dict[int, int] = {}

    async def call(i: int) -> None:
        results[i] = await combine(i)

    await _behind_one_in_flight(call, 6, handle)
    assert results == {i: 2 * i for i in range(6)}
    # The first is sent alone; the five that queued behind it go at most three at a time.
    assert handle.batches == [[0], [1, 2, 3], [4, 5]]


async def test_a_failed_batch_fails_each_of_its_members_and_no_other() -> None:
    handle = Recorder()
    handle.hold, handle.fail_on = True, 2
    combine: Combiner[int, int] = Combiner(handle)
    outcomes: dict[int, object] = {}

    async def call(i: int) -> None:
        try:
            outcomes[i] = await combine(i)
        except ValueError as exc:
            outcomes[i] = str(exc)

    await _behind_one_in_flight(call, 4, handle)
    assert handle.batches == [[0], [1, 2, 3]]
    assert outcomes == {0: 0, 1: "bad item 2", 2: "bad item 2", 3: "bad item 2"}


async def test_a_caller_cancelled_before_its_batch_is_sent_is_never_sent() -> None:
    handle = Recorder()
    handle.hold = True
    combine: Combiner[int, int] = Combiner(handle)
    async with anyio.create_task_group() as tg:
        tg.start_soon(combine, 1)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as waiting:
            waiting.cancel()
            await combine(2)
        handle.release.set()
    assert handle.batches == [[1]]
    assert await combine(3) == 6
    assert handle.batches == [[1], [3]]


async def test_a_batch_in_flight_finishes_for_its_members_when_its_sender_is_cancelled() -> None:
    handle = Recorder()
    handle.hold = True
    combine: Combiner[int, int] = Combiner(handle)
    results: list[int] = []
    sender_scope = anyio.CancelScope()

    async def sender() -> None:
        with sender_scope:
            results.append(await combine(1))

    async def member() -> None:
        results.append(await combine(2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(sender)  # sends [1] and is held there
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(member)  # queued behind it
        await anyio.wait_all_tasks_blocked()
        sender_scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert handle.batches == [[1]]  # still in flight: the cancel did not abandon it
        handle.release.set()
    assert handle.batches == [[1], [2]]
    assert 4 in results


async def test_a_caller_cancelled_as_its_turn_to_send_comes_passes_the_turn_on() -> None:
    """Only the first caller in line wakes when a batch ends (not every waiter); if it is
    cancelled just then, the next in line must send, or every call behind it waits forever."""
    handle = Recorder()
    handle.hold = True
    combine: Combiner[int, int] = Combiner(handle, max_batch=1)
    results: dict[int, int] = {}
    scopes = {i: anyio.CancelScope() for i in range(4)}

    async def call(i: int) -> None:
        with scopes[i]:
            results[i] = await combine(i)

    handle.on_release = scopes[1].cancel  # as [0] ends, [1] (first in line) is cancelled
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0)
            await anyio.wait_all_tasks_blocked()  # [0] is in flight
            for i in (1, 2, 3):
                tg.start_soon(call, i)
            await anyio.wait_all_tasks_blocked()
            handle.release.set()
    assert handle.batches == [[0], [2], [3]]
    assert results == {0: 0, 2: 4, 3: 6}
