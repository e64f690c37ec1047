"""Time-ordered ids: UUIDv7 (RFC 9562) for workflows and steps, so new index entries
land at the right edge of their indexes instead of on random pages."""

from __future__ import annotations

import time
from uuid import UUID

from orchestrator.store.ids import time_ordered


def test_an_id_is_a_version_7_uuid_starting_with_its_time_in_ms() -> None:
    before = time.time_ns() // 1_000_000
    made = time_ordered()
    after = time.time_ns() // 1_000_000
    assert made.version == 7 and made.variant == "specified in RFC 4122"
    assert before <= made.int >> 80 <= after
    assert UUID(str(made)) == made


def test_ids_made_later_sort_after_and_none_repeat() -> None:
    first = [time_ordered() for _ in range(1000)]
    time.sleep(0.002)
    second = [time_ordered() for _ in range(1000)]
    assert max(first) < min(second)
    assert len(set(first + second)) == 2000
