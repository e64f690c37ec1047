"""The read-ahead's own rules: taken once, at its attempt, within its time, bounded in size
(the steps it is used for: tests/test_step_protocol.py)."""

from __future__ import annotations

import time
from uuid import uuid4

import pytest

from orchestrator.schemas import TaskEnvelope
from orchestrator.store.read_ahead import ReadAhead
from orchestrator.store.steps import OpenStep


def _envelope(attempt: int = 1) -> TaskEnvelope:
    return TaskEnvelope(
        workflow_id=uuid4(),
        step_id=uuid4(),
        seq=1,
        pipeline="p",
        agent="a",
        attempt=attempt,
        tenant_id="t",
        assigned_by="submit",
        payload={},
    )


OPENED = OpenStep(True, "", tenant_id="t", session_id="s", customer_id="c")


def test_a_read_ahead_is_taken_once_and_only_at_its_attempt() -> None:
    ahead = ReadAhead(5.0)
    envelope = _envelope()
    ahead.put(envelope, OPENED)
    assert ahead.take(envelope) == OPENED
    assert ahead.take(envelope) is None and ahead.taken == 1

    ahead.put(envelope, OPENED)
    assert ahead.take(envelope.model_copy(update={"attempt": 2})) is None  # and dropped
    assert ahead.take(envelope) is None and len(ahead) == 0 and ahead.taken == 1


def test_a_read_ahead_expires_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    ahead = ReadAhead(1.0, limit=3)
    first, second = _envelope(), _envelope()
    ahead.put(first, OPENED)
    now[0] += 0.5
    ahead.put(second, OPENED)
    now[0] += 0.6  # the first is 1.1 s old, the second 0.6 s
    assert ahead.take(first) is None
    assert ahead.take(second) == OPENED

    kept = [_envelope() for _ in range(5)]
    for envelope in kept:
        ahead.put(envelope, OPENED)
    assert len(ahead) == 3  # the oldest went first
    assert [ahead.take(e) for e in kept] == [None, None, OPENED, OPENED, OPENED]

    now[0] += 2.0  # all expired: the next put drops them
    ahead.put(first, OPENED)
    assert len(ahead) == 1

    off = ReadAhead(0.0)
    off.put(first, OPENED)
    assert len(off) == 0 and off.take(first) is None
