"""What a running step needs from the runtime, as a protocol.

The step API depends on this shape, not on ``Runtime`` (which imports the app,
which imports the agents, which use the step API): no import cycle, and a test
kit can run an agent on a lighter implementation. Redis reaches a step only
through ``WorkingMemoryCache`` and ``RecallCache``: the step API never imports
the Redis side (``orchestrator.coordination``), whose classes implement them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from opentelemetry.trace import Tracer

from orchestrator.faults import CrashPoints
from orchestrator.metrics import Metrics
from orchestrator.models.embeddings import Embedder
from orchestrator.models.llm import LanguageModel
from orchestrator.models.pricing import Pricing
from orchestrator.schemas.memory import Patch, WorkingMemory
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


class WorkingMemoryCache(Protocol):
    """Sessions' working memories in Redis, with the runtime's TTL and byte cap (speed
    only: Postgres holds everything they hold)."""

    async def load(self, tenant: str, session: str) -> WorkingMemory | None:
        """The session's working memory; None when there is none; ``CorruptWorkingMemory``
        when the stored value is not one."""
        ...

    async def store(self, tenant: str, session: str, value: WorkingMemory) -> WorkingMemory:
        """Write ``value``, cut to the byte cap; returns what was written."""
        ...

    def append_in(self, pipe: Any, tenant: str, session: str, patch: Patch) -> None:
        """Queue ``patch`` on a Redis pipeline (applied only to a value that exists)."""
        ...

    def drop_in(self, pipe: Any, tenant: str, session: str) -> None:
        """Queue deleting the session's working memory on a Redis pipeline."""
        ...


class CachedRecall(Protocol):
    """One recall cache lookup."""

    @property
    def value(self) -> dict[str, Any] | None:
        """The cached result, or None on a miss."""
        ...

    @property
    def versions(self) -> tuple[str, str] | None:
        """The memory versions read with it (pass them to ``RecallCache.put``)."""
        ...


class RecallCache(Protocol):
    """Recall results cached per session in Redis (speed only); Redis down is a miss."""

    async def get(self, tenant: str, session: str, customer: str, name: str) -> CachedRecall:
        """The current cached value of field ``name`` of the session, or a miss."""
        ...

    async def put(
        self,
        tenant: str,
        session: str,
        name: str,
        versions: tuple[str, str] | None,
        value: dict[str, Any],
    ) -> bool:
        """Cache ``value`` under ``name`` with the ``versions`` its lookup read; False when
        it was not cached."""
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
    def metrics(self) -> Metrics:
        """The runtime's metric instruments (tool calls, model usage)."""
        ...

    @property
    def pricing(self) -> Pricing:
        """What model calls cost (the metrics' cost per tenant)."""
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
    def working_memory(self) -> WorkingMemoryCache:
        """Sessions' working memories in Redis."""
        ...

    @property
    def recall_cache(self) -> RecallCache:
        """Recall results cached per session in Redis."""
        ...
