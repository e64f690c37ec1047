"""Running one agent on one step's state: validation, the timeout, the output check.

Shared by the engine's step protocol and the in-process test kit, so both run an
agent exactly the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError

from orchestrator.errors import AgentError
from orchestrator.step.agent import Agent
from orchestrator.step.context import StepContext, bind


async def run_agent(
    agent: Agent[Any, Any], ctx: StepContext, state: Mapping[str, Any]
) -> BaseModel:
    """Validate ``state`` into the agent's input model, run it with ``ctx`` current and
    within its ``timeout_seconds``, and check it returned its output model.

    A state that does not fit, or a wrong output type, is a non-retryable AgentError; a
    timeout is a retryable one. Control flow (``Parked``) passes through.
    """
    cls = type(agent)
    try:
        data = cls.input_model.model_validate(state)
    except ValidationError as exc:
        raise AgentError(
            f"input does not fit {cls.input_model.__name__}: {exc}", non_retryable=True
        ) from exc
    token = bind(ctx)
    try:
        with anyio.fail_after(cls.timeout_seconds):
            output = await agent.run(ctx, data)
    except TimeoutError as exc:
        raise AgentError(f"timed out after {cls.timeout_seconds}s") from exc
    finally:
        token.var.reset(token)
    if not isinstance(output, cls.output_model):
        raise AgentError(
            f"run() returned {type(output).__name__}, expected {cls.output_model.__name__}",
            non_retryable=True,
        )
    return output
