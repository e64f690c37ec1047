"""Time-ordered ids (UUID version 7, RFC 9562) for rows inserted on the hot path.

A random id (version 4) puts each new index entry on a random leaf page of an
index that grows with the history; after every checkpoint, the first change to
a page writes all of it to the WAL (a full-page image). With 1M finished
workflows, those images were 83 % of the WAL a run wrote (benchmarks/compare.py
--fill). A version 7 id starts with its creation time in milliseconds, so new
entries land together at the right edge of the index, on pages already written.
"""

from __future__ import annotations

import os
import time
from uuid import UUID

_VERSION = 0x7 << 76  # bits 76-79
_VARIANT = 0x2 << 62  # bits 62-63: RFC 9562
_KEEP = ~((0xF << 76) | (0x3 << 62))


def time_ordered() -> UUID:
    """A new UUIDv7: 48 bits of Unix time in ms, then 74 random bits (version and
    variant in their places). Ids made in the same millisecond are in random order."""
    ms = time.time_ns() // 1_000_000
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | int.from_bytes(os.urandom(10), "big")
    return UUID(int=(value & _KEEP) | _VERSION | _VARIANT)
