"""What a running step needs from the runtime, as a protocol.

The step API depends on this shape, not on ``Runtime`` (which imports the app,
which imports the agents, which use the step API): no import cycle, and a test
kit can run an agent on a lighter implementation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from opentelemetry.trace import Tracer

from orchestrator.faults import CrashPoints
from orchestrator.models.embeddings import Embedder
from orchestrator.models.llm import LanguageModel
from orchestrator.settings import Settings
from orchestrator.step.tools import ToolSpec
from orchestrator.store.operations import Store


class ToolRegistry(Protocol):
    @property
    def tools(self) -> Mapping[str, ToolSpec]: ...

    @property
    def version(self) -> str: ...


class Limiter(Protocol):
    async def take(self, tenant: str, cost: float = 1.0) -> None: ...


class StepServices(Protocol):
    """Satisfied by ``orchestrator.Runtime``."""

    @property
    def app(self) -> ToolRegistry: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def tracer(self) -> Tracer: ...

    @property
    def crash(self) -> CrashPoints: ...

    @property
    def model(self) -> LanguageModel: ...

    @property
    def model_limiter(self) -> Limiter | None: ...

    @property
    def embedder(self) -> Embedder: ...

    @property
    def store(self) -> Store: ...
