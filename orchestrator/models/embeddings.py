"""Text embeddings for semantic memory: the offline lexical embedder and any
OpenAI-compatible ``/embeddings`` endpoint.

``LexicalEmbedder`` (the default) hashes word unigrams and bigrams into a fixed
vector (the "hashing trick"): deterministic, no network, good enough to find a
past ticket that shares its words, blind to synonyms. ``OpenAIEmbedder`` asks a
server (OpenAI, Ollama, vLLM, text-embeddings-inference at ``OPENAI_BASE_URL``).

Each embedder's ``name`` encodes what made a vector and its length; it is stored
with every memory, and memories of another embedder are never compared with
the current one.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from orchestrator.errors import AgentError, ConfigurationError

if TYPE_CHECKING:  # openai takes half a second to import: only when it is used
    import openai
    from openai import AsyncOpenAI
    from openai.types import CreateEmbeddingResponse

DIMENSIONS = 256  # the default of ORCHESTRATOR_EMBEDDING_DIMENSIONS
# Inputs per request: well under OpenAI's 2,048, and small enough for local servers.
BATCH_SIZE = 128
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be but by for from has have i in is it its me my of on or our so that "
    "the this to was we were will with you your".split()
)


class Embedder(Protocol):
    """Turns text into vectors for semantic memory; ``name`` says which embedder made
    them (and their length), ``dimensions`` how many floats each has."""

    name: str
    dimensions: int

    async def embed(self, text: str) -> list[float]:
        """The embedding of ``text``: ``dimensions`` floats."""
        ...

    async def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        """The embeddings of ``texts``, in order."""
        ...


class LexicalEmbedder:
    """The offline embedder: ``embed_offline`` behind the ``Embedder`` interface."""

    def __init__(self, dimensions: int = DIMENSIONS) -> None:
        self.dimensions = dimensions
        self.name = f"lexical-hash-{dimensions}"

    async def embed(self, text: str) -> list[float]:
        """``embed_offline(text, dimensions)``: deterministic, no network."""
        return embed_offline(text, self.dimensions)

    async def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        """``embed_offline`` of each text."""
        return [embed_offline(text, self.dimensions) for text in texts]


def embed_offline(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """Hashed word unigrams and bigrams (stop words dropped) as a unit vector of
    ``dimensions`` floats; all zeros when the text has no words."""
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOP]
    features = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
    vec = [0.0] * dimensions
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dimensions
        vec[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


class OpenAIEmbedder:
    """Embeddings from any OpenAI-compatible ``/embeddings`` endpoint.

    ``dimensions`` is sent with each request (text-embedding-3 shortens its vectors
    to it); a server that refuses the parameter is asked once more without it, and
    then never again. Every vector's length is checked against ``dimensions``.

    The client's timeout and retries (429, 5xx, connection errors) bound each call;
    what still fails raises ``AgentError``: retryable when the server is unavailable,
    not when it refuses. A vector of the wrong length raises ``ConfigurationError``.
    """

    def __init__(self, client: AsyncOpenAI, model: str, dimensions: int) -> None:
        self.name = f"openai:{model}:{dimensions}"
        self.dimensions = dimensions
        self._client = client
        self._model = model
        self._send_dimensions = True

    async def aclose(self) -> None:
        """Close the OpenAI client (and its HTTP connections)."""
        await self._client.close()

    async def embed(self, text: str) -> list[float]:
        """The embedding of ``text``: one request."""
        return (await self.embed_many([text]))[0]

    async def embed_many(self, texts: Sequence[str]) -> list[list[float]]:
        """The embeddings of ``texts``, in order: one request per ``BATCH_SIZE`` texts."""
        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH_SIZE):
            vectors.extend(await self._batch(list(texts[start : start + BATCH_SIZE])))
        return vectors

    async def _batch(self, texts: list[str]) -> list[list[float]]:
        import openai  # loaded already: a client of it exists

        try:
            response = await self._create(texts, self._send_dimensions)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as exc:
            if not self._send_dimensions:
                raise self._refused(exc) from exc
            # Perhaps the server does not know `dimensions`: ask without it. Only a success
            # proves that, so a request that was bad for another reason changes nothing.
            try:
                response = await self._create(texts, False)
            except openai.APIStatusError:
                raise self._refused(exc) from exc
            self._send_dimensions = False
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(texts):
            raise AgentError(
                f"embedding model {self._model} returned {len(data)} vectors for {len(texts)} texts"
            )
        vectors = [list(item.embedding) for item in data]
        for vector in vectors:
            if len(vector) != self.dimensions:
                raise ConfigurationError(
                    f"embedding model {self._model} returns {len(vector)} floats, "
                    f"ORCHESTRATOR_EMBEDDING_DIMENSIONS is {self.dimensions}: set it to "
                    f"{len(vector)} (or use a model that honours `dimensions`)"
                )
        return vectors

    async def _create(self, texts: list[str], send_dimensions: bool) -> CreateEmbeddingResponse:
        import openai  # loaded already: a client of it exists

        try:
            return await self._client.embeddings.create(
                model=self._model,
                input=texts,
                # Floats, not the client's default base64: not every local server has it.
                encoding_format="float",
                dimensions=self.dimensions if send_dimensions else openai.omit,
            )
        except (
            openai.RateLimitError,
            openai.InternalServerError,
            openai.APIConnectionError,  # timeouts included
        ) as exc:
            raise AgentError(
                f"embedding model {self._model} unavailable at {self._client.base_url}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        except openai.APIStatusError as exc:
            if isinstance(exc, openai.BadRequestError | openai.UnprocessableEntityError):
                raise  # _batch decides: perhaps only `dimensions` was refused
            raise self._refused(exc) from exc

    def _refused(self, exc: openai.APIStatusError) -> AgentError:
        return AgentError(
            f"embedding model {self._model} at {self._client.base_url} refused the request: "
            f"{exc.status_code} {exc.message}",
            non_retryable=True,
        )
