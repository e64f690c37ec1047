"""A registered tool: its function, its idempotency policy, and how a model sees it."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import create_model

from orchestrator.models.llm import ToolDef

ToolFn = Callable[..., Awaitable[Any]]
# Parameters the runtime supplies to a tool that declares them; a model never sees them.
RUNTIME_PARAMS = frozenset({"idempotency_key", "fencing_token"})


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A registered tool: its function, idempotency policy, reconcile check and timeout."""

    name: str
    fn: ToolFn
    # Idempotent tools may run again after a crash (with the same key); others never silently.
    idempotent: bool
    takes_key: bool
    # For a non-idempotent tool: given the call's key and arguments, says whether an
    # in-doubt call took effect (its result) or not (None: safe to call again).
    reconcile: ToolFn | None = None
    # The tool takes ``fencing_token`` (the step execution's attempt), for remotes that
    # refuse a superseded caller.
    takes_token: bool = False
    timeout: float | None = None  # seconds; default ``tool_timeout_seconds``

    def definition(self) -> ToolDef:
        """How the tool is offered to a model: JSON schema of its parameters, its docstring."""
        fields: dict[str, Any] = {}
        for param in inspect.signature(self.fn).parameters.values():
            if param.name in RUNTIME_PARAMS:
                continue  # supplied by the runtime, never by the model
            annotation = Any if param.annotation is inspect.Parameter.empty else param.annotation
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (annotation, default)
        schema = create_model(f"{self.name}_args", **fields).model_json_schema()
        # Strict function calling (what structured-output parsing requires): every
        # parameter listed as required, no others allowed, no defaults.
        properties = schema.get("properties", {})
        for prop in properties.values():
            prop.pop("default", None)
        schema.update(required=list(properties), additionalProperties=False)
        return ToolDef(self.name, inspect.getdoc(self.fn) or self.name, schema)
