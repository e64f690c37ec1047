"""The one interface every model call goes through, and its two implementations.

``OfflineModel`` is deterministic and needs no network or key: each request
``purpose`` maps to a rule function (keywords, templates) registered by the
app. ``OpenAIModel`` asks any OpenAI-compatible server for structured output
parsed straight into the agent's pydantic model, and can run a tool-calling
loop in which the model picks tools that run through the step's tool ledger.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.errors import AgentError, ConfigurationError

if TYPE_CHECKING:  # openai takes half a second to import: only when it is used
    from openai import AsyncOpenAI

T = TypeVar("T", bound=BaseModel)

OFFLINE_MODEL_NAME = "offline-rules-v1 (deterministic, no API key)"


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One model call. Only ``instructions`` and ``content`` are sent to a real model;
    ``context`` carries values for the offline rules."""

    purpose: str  # what the call is for ("triage", "reply"): offline rules key on it
    instructions: str
    content: str
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens used by model calls; add two with ``+``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )


@dataclass(frozen=True, slots=True)
class Completion(Generic[T]):
    """A parsed answer and the tokens it took."""

    value: T
    usage: Usage


@dataclass(frozen=True, slots=True)
class ToolDef:
    """A tool offered to the model: its name, what it does, and its JSON-schema parameters."""

    name: str
    description: str
    parameters: dict[str, Any]


# Runs one tool the model chose (through the ledger) and returns its JSON-able result.
ToolRunner = Callable[[str, dict[str, Any]], Awaitable[Any]]


class LanguageModel(Protocol):
    """What every model call goes through; ``name`` is recorded with each step's usage."""

    name: str

    async def complete(
        self,
        request: ModelRequest,
        output: type[T],
        tools: Sequence[ToolDef] = (),
        run_tool: ToolRunner | None = None,
        max_turns: int = 6,
    ) -> Completion[T]:
        """An answer parsed as ``output``; with ``tools``, the model may call them through
        ``run_tool`` for at most ``max_turns`` turns."""
        ...


OfflineRule = Callable[[ModelRequest], Mapping[str, Any]]


class OfflineModel:
    """Deterministic, no network or key: the app's rule for a request's ``purpose`` answers."""

    def __init__(self, rules: Mapping[str, OfflineRule]) -> None:
        self.name = OFFLINE_MODEL_NAME
        self._rules = dict(rules)

    async def complete(
        self,
        request: ModelRequest,
        output: type[T],
        tools: Sequence[ToolDef] = (),
        run_tool: ToolRunner | None = None,
        max_turns: int = 6,
    ) -> Completion[T]:
        """The rule's answer validated as ``output``, with zero usage. ConfigurationError when
        tools are offered or no rule fits the purpose; a non-retryable AgentError when the
        rule's answer does not fit ``output``."""
        if tools:
            raise ConfigurationError(
                "the offline model cannot choose tools; call them from the agent, "
                "or set OPENAI_API_KEY for a real model"
            )
        rule = self._rules.get(request.purpose)
        if rule is None:
            raise ConfigurationError(
                f"the offline model has no rule for purpose {request.purpose!r}; "
                "register one with App.offline_rule or set OPENAI_API_KEY"
            )
        try:
            return Completion(output.model_validate(rule(request)), Usage())
        except ValidationError as exc:
            raise AgentError(
                f"offline rule {request.purpose!r} gave invalid output: {exc}", non_retryable=True
            ) from exc


class OpenAIModel:
    """Structured outputs from any OpenAI-compatible server.

    The client retries 429 and 5xx itself, honouring Retry-After, up to its
    ``max_retries``; what still fails becomes a retryable step error.
    """

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self.name = model
        self._client = client
        self._model = model

    async def aclose(self) -> None:
        """Close the OpenAI client (and its HTTP connections)."""
        await self._client.close()

    async def complete(
        self,
        request: ModelRequest,
        output: type[T],
        tools: Sequence[ToolDef] = (),
        run_tool: ToolRunner | None = None,
        max_turns: int = 6,
    ) -> Completion[T]:
        """An answer parsed as ``output``, running the tools the model calls through
        ``run_tool`` for at most ``max_turns`` turns; usage adds up every turn. Failures raise
        AgentError: retryable when the server is unavailable, not when it refuses."""
        messages: list[Any] = [
            {"role": "system", "content": request.instructions},
            {"role": "user", "content": request.content},
        ]
        usage = Usage()
        for _ in range(max_turns):
            message, turn_usage = await self._turn(messages, output, tools)
            usage = usage + turn_usage
            if not message.tool_calls:
                if message.parsed is None:
                    raise AgentError(
                        f"model {self._model} returned no {output.__name__}"
                        f" (refusal: {message.refusal!r})"
                    )
                return Completion(message.parsed, usage)
            if run_tool is None:
                raise AgentError(f"model {self._model} asked for tools none were offered")
            messages.append(
                message.model_dump(include={"role", "content", "tool_calls"}, exclude_none=True)
            )
            for call in message.tool_calls:
                result = await run_tool(call.function.name, _arguments(call.function.arguments))
                messages.append(
                    {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)}
                )
        raise AgentError(f"model {self._model} still calling tools after {max_turns} turns")

    async def _turn(
        self, messages: list[Any], output: type[T], tools: Sequence[ToolDef]
    ) -> tuple[Any, Usage]:
        import openai  # loaded already: a client of it exists

        extra: dict[str, Any] = {}
        if tools:
            extra["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": t.name,
                        "description": t.description,
                        "parameters": t.parameters,
                        "strict": True,
                    },
                }
                for t in tools
            ]
        try:
            completion = await self._client.chat.completions.parse(
                model=self._model,
                messages=messages,
                response_format=output,
                **extra,
            )
        except ValidationError as exc:
            raise AgentError(
                f"model {self._model} returned malformed {output.__name__}: "
                f"{exc.errors()[0]['msg']}"
            ) from exc
        except (
            openai.RateLimitError,
            openai.InternalServerError,
            openai.APIConnectionError,
            openai.APITimeoutError,
        ) as exc:
            raise AgentError(f"model {self._model} unavailable: {exc}") from exc
        except openai.APIStatusError as exc:
            raise AgentError(
                f"model {self._model} refused the request: {exc}", non_retryable=True
            ) from exc
        usage = completion.usage
        return completion.choices[0].message, Usage(
            usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0
        )


def _arguments(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise AgentError(f"model sent tool arguments that are not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise AgentError("model sent tool arguments that are not an object")
    return value
