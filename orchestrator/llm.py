"""The one interface every model call goes through, and its two implementations.

``OfflineModel`` is deterministic and needs no network or key: each request
``purpose`` maps to a rule function (keywords, templates) registered by the
app. ``OpenAIModel`` asks any OpenAI-compatible server for structured output
parsed straight into the agent's pydantic model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from openai import AsyncOpenAI
from pydantic import BaseModel, ValidationError

from orchestrator.errors import AgentError, ConfigurationError

T = TypeVar("T", bound=BaseModel)

OFFLINE_MODEL_NAME = "offline-rules-v1 (deterministic, no API key)"


@dataclass(frozen=True, slots=True)
class ModelRequest:
    purpose: str  # what the call is for ("triage", "reply"): offline rules key on it
    instructions: str
    content: str
    context: Mapping[str, Any] = field(default_factory=dict)


class LanguageModel(Protocol):
    name: str

    async def parse(self, request: ModelRequest, output: type[T]) -> T: ...


OfflineRule = Callable[[ModelRequest], Mapping[str, Any]]


class OfflineModel:
    def __init__(self, rules: Mapping[str, OfflineRule]) -> None:
        self.name = OFFLINE_MODEL_NAME
        self._rules = dict(rules)

    async def parse(self, request: ModelRequest, output: type[T]) -> T:
        rule = self._rules.get(request.purpose)
        if rule is None:
            raise ConfigurationError(
                f"the offline model has no rule for purpose {request.purpose!r}; "
                "register one with App.offline_rule or set OPENAI_API_KEY"
            )
        try:
            return output.model_validate(rule(request))
        except ValidationError as exc:
            raise AgentError(
                f"offline rule {request.purpose!r} gave invalid output: {exc}", non_retryable=True
            ) from exc


class OpenAIModel:
    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self.name = model
        self._client = client
        self._model = model

    async def parse(self, request: ModelRequest, output: type[T]) -> T:
        completion = await self._client.chat.completions.parse(
            model=self._model,
            messages=[
                {"role": "system", "content": request.instructions},
                {"role": "user", "content": request.content},
            ],
            response_format=output,
        )
        parsed = completion.choices[0].message.parsed
        if parsed is None:
            raise AgentError(f"model {self._model} returned no parsable {output.__name__}")
        return parsed
