"""Embeddings: the offline lexical embedder, and any OpenAI-compatible /embeddings endpoint
through the real OpenAI client talking HTTP to a local server (tests/llm_server.py)."""

from __future__ import annotations

import hashlib
import math
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from orchestrator.app import App
from orchestrator.errors import AgentError, ConfigurationError
from orchestrator.models.embeddings import LexicalEmbedder, OpenAIEmbedder, embed_offline
from orchestrator.runtime import build_embedder, open_runtime
from orchestrator.settings import Settings
from tests.conftest import drop_test_data, fetch
from tests.llm_server import ModelServer, Reply, model_server

pytestmark = pytest.mark.anyio

NATIVE = 48  # the local model's own length, when `dimensions` is not sent


def _vector(text: str, length: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    return [(digest[i % len(digest)] - 128) / 128 for i in range(length)]


def embeddings(*, honour_dimensions: bool = True, reject_dimensions: bool = False) -> Any:
    """A reply function for the local server: deterministic vectors per input text."""

    def reply(body: dict[str, Any]) -> Reply:
        if reject_dimensions and "dimensions" in body:
            error = {"message": "unknown field: dimensions", "type": "invalid_request_error"}
            return 400, {}, {"error": error}
        length = body["dimensions"] if honour_dimensions and "dimensions" in body else NATIVE
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        # Out of order on purpose: the client must sort by index.
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(text, length)}
            for i, text in reversed(list(enumerate(inputs)))
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return 200, {}, {"object": "list", "data": data, "model": body["model"], "usage": usage}

    return reply


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ModelServer]:
    # One server for the module: each shutdown waits out serve_forever's 0.5 s poll.
    with model_server() as state:
        yield state


@pytest.fixture
def server(shared_server: ModelServer) -> ModelServer:
    shared_server.requests.clear()
    shared_server.default = embeddings()
    return shared_server


def online(settings: Settings, url: str, **update: Any) -> Settings:
    values = {
        "embedding_model": "local-embed",
        "embedding_dimensions": 64,
        "openai_base_url": url,
        "openai_max_retries": 0,
        "openai_timeout_seconds": 2.0,
        **update,
    }
    return settings.model_copy(update=values)


async def test_lexical_embedder_is_deterministic_unit_length_and_named_by_dimension() -> None:
    embedder = LexicalEmbedder(64)
    first, again = await embedder.embed_many(["Refund the duplicate charge"] * 2)
    assert first == again == embed_offline("refund duplicate charge", 64)
    assert len(first) == 64 and math.isclose(sum(v * v for v in first), 1.0)
    assert embedder.name == "lexical-hash-64" != LexicalEmbedder().name
    assert await embedder.embed("the of and") == [0.0] * 64  # no words: no direction


async def test_dimensions_batch_and_name(settings: Settings, server: ModelServer) -> None:
    embedder = build_embedder(online(settings, server.url))
    assert isinstance(embedder, OpenAIEmbedder)
    try:
        texts = [f"ticket {i}" for i in range(130)]  # two requests: 128 + 2
        vectors = await embedder.embed_many(texts)
        single = await embedder.embed("ticket 7")
    finally:
        await embedder.aclose()
    assert vectors == [_vector(t, 64) for t in texts] and single == vectors[7]
    bodies = [body for _, body in server.requests]
    assert [len(b["input"]) for b in bodies] == [128, 2, 1]
    assert all(b["dimensions"] == 64 and b["model"] == "local-embed" for b in bodies)
    assert all(b["encoding_format"] == "float" for b in bodies)
    assert embedder.name == "openai:local-embed:64"  # stored with each memory


async def test_a_server_refusing_dimensions_is_asked_without_them_once(
    settings: Settings, server: ModelServer
) -> None:
    server.default = embeddings(reject_dimensions=True)
    embedder = build_embedder(online(settings, server.url, embedding_dimensions=NATIVE))
    try:
        assert await embedder.embed_many(["a", "b"]) == [_vector("a", NATIVE), _vector("b", NATIVE)]
        await embedder.embed("c")
    finally:
        assert isinstance(embedder, OpenAIEmbedder)
        await embedder.aclose()
    asked = ["dimensions" in body for _, body in server.requests]
    assert asked == [True, False, False]  # refused once, then never sent again


async def test_a_vector_of_the_wrong_length_is_a_clear_configuration_error(
    settings: Settings, server: ModelServer
) -> None:
    server.default = embeddings(honour_dimensions=False)  # as a server ignoring `dimensions`
    embedder = build_embedder(online(settings, server.url))
    assert isinstance(embedder, OpenAIEmbedder)
    try:
        with pytest.raises(ConfigurationError) as caught:
            await embedder.embed("hello")
    finally:
        await embedder.aclose()
    assert "returns 48 floats, ORCHESTRATOR_EMBEDDING_DIMENSIONS is 64" in str(caught.value)


async def test_an_unreachable_or_silent_server_is_a_retryable_step_error(
    settings: Settings,
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"  # nothing listens
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        black_hole = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        for url in (down, black_hole):
            embedder = build_embedder(online(settings, url, openai_timeout_seconds=0.3))
            assert isinstance(embedder, OpenAIEmbedder)
            try:
                with pytest.raises(AgentError) as caught:
                    await embedder.embed("hello")
            finally:
                await embedder.aclose()
            assert not caught.value.non_retryable  # a step failure, retried later
            assert "embedding model local-embed unavailable at http://127.0.0.1" in str(
                caught.value
            )


async def test_the_memories_column_follows_the_configured_dimension(
    settings: Settings, server: ModelServer
) -> None:
    configured = online(settings, server.url)
    try:
        async with open_runtime(configured, App("embeddings")) as runtime:
            assert runtime.embedder.name == "openai:local-embed:64"
            rows = await fetch(
                runtime,
                "SELECT format_type(atttypid, atttypmod) AS type FROM pg_attribute "
                "WHERE attrelid = 'memories'::regclass AND attname = 'embedding'",
            )
        assert rows[0]["type"] == "vector(64)"
    finally:
        await drop_test_data(configured)
