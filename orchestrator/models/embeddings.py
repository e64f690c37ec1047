"""Text embeddings for semantic memory.

The offline embedder hashes word unigrams and bigrams into a fixed vector
(the "hashing trick"): deterministic, no network, good enough to find a past
ticket that shares its words. It is named as offline wherever it is recorded.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from typing import Protocol

DIMENSIONS = 256  # matches memories.embedding vector(256)
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be but by for from has have i in is it its me my of on or our so that "
    "the this to was we were will with you your".split()
)


class Embedder(Protocol):
    """Turns text into a vector for semantic memory; ``name`` says which embedder made it."""

    name: str

    async def embed(self, text: str) -> list[float]:
        """The embedding of ``text`` (``DIMENSIONS`` floats, as the memories table stores)."""
        ...


class HashingEmbedder:
    """The offline embedder: ``embed_offline`` behind the ``Embedder`` interface."""

    name = f"offline-hashing-{DIMENSIONS}"

    async def embed(self, text: str) -> list[float]:
        """``embed_offline(text)``: deterministic, no network."""
        return embed_offline(text)


def embed_offline(text: str) -> list[float]:
    """Hashed word unigrams and bigrams (stop words dropped) as a unit vector of
    ``DIMENSIONS`` floats; all zeros when the text has no words."""
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOP]
    features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    vec = [0.0] * DIMENSIONS
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % DIMENSIONS
        vec[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
