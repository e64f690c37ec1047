"""What a running step needs from the runtime, as a protocol.

The step API depends on this shape, not on ``Runtime`` (which imports the app,
which imports the agents, which use the step API): no import cycle, and a test
kit can run an agent on a lighter implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import redis.asyncio as aioredis
from opentelemetry.trace import Tracer

from orchestrator.coordination.keys import Keys
from orchestrator.faults import CrashPoints
from orchestrator.models.embeddings import Embedder
from orchestrator.models.llm import LanguageModel
from orchestrator.settings import Settings
from orchestrator.step.tools import ToolSpec
from orchestrator.store.operations import Store


class ToolRegistry(Protocol):
    """The part of the App a step needs: its tools and version."""

    @property
    def tools(self) -> Mapping[str, ToolSpec]:
        """Registered tools by name."""
        ...

    @property
    def version(self) -> str:
        """The app's version (non-determinism messages name it)."""
        ...


class Limiter(Protocol):
    """A per-tenant rate limit for model calls."""

    async def take(self, tenant: str, cost: float = 1.0) -> None:
        """Wait for ``cost`` of ``tenant``'s budget, or raise a retryable RateLimited."""
        ...


class StepServices(Protocol):
    """Satisfied by ``orchestrator.Runtime``."""

    @property
    def app(self) -> ToolRegistry:
        """The app's tools and version."""
        ...

    @property
    def settings(self) -> Settings:
        """The runtime's settings."""
        ...

    @property
    def tracer(self) -> Tracer:
        """The OpenTelemetry tracer (tool calls are spans)."""
        ...

    @property
    def crash(self) -> CrashPoints:
        """Fault-injection crash points (no-ops unless a test sets them)."""
        ...

    @property
    def model(self) -> LanguageModel:
        """The language model (OpenAI-compatible or offline)."""
        ...

    @property
    def model_limiter(self) -> Limiter | None:
        """The per-tenant model rate limit, if one is set."""
        ...

    @property
    def embedder(self) -> Embedder:
        """The embedder for memory search."""
        ...

    @property
    def store(self) -> Store:
        """Postgres behind named operations."""
        ...

    @property
    def redis(self) -> aioredis.Redis:
        """The runtime's Redis client (working memory, recall cache)."""
        ...

    @property
    def keys(self) -> Keys:
        """The Redis key namespace."""
        ...
