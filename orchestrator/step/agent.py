"""The Agent base class: a custom agent is a subclass with a name, typed models and ``run``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from orchestrator.step.context import StepContext

InT = TypeVar("InT", bound=BaseModel)
OutT = TypeVar("OutT", bound=BaseModel)


class AgentInput(BaseModel):
    """Base for input models: built from the workflow state, so extra keys are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class AgentOutput(BaseModel):
    """Base for output models: stored in Postgres and passed on, so strict."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Agent(Generic[InT, OutT]):
    """Subclass, set the class attributes, implement ``run``; register with ``app.agent``.

    The workflow state is a dict of every earlier agent's output under its name
    (plus ``ticket``); ``input_model`` is validated from it, and the output is
    stored under ``name`` for the agents after this one.
    """

    name: ClassVar[str]
    input_model: ClassVar[type[BaseModel]]
    output_model: ClassVar[type[BaseModel]]
    # The only tools this agent may call; empty (the default) allows every registered tool.
    tools: ClassVar[tuple[str, ...]] = ()
    routes: ClassVar[tuple[str, ...]] = ()  # agents route() may name besides the pipeline's
    max_attempts: ClassVar[int | None] = None  # None: the runtime's default
    timeout_seconds: ClassVar[float] = 120.0
    # A join runs once, after every open branch of its workflow has ended, on the
    # workflow state with every branch's output. route() naming several agents forks.
    join: ClassVar[bool] = False
    # For a join: a failed branch does not fail the workflow; the join runs without it
    # and finds the error under ``branch_errors[agent]`` in the state.
    optional_branches: ClassVar[bool] = False

    async def run(self, ctx: StepContext, data: InT) -> OutT:
        """Do the step's work on the validated input; return the output model. Called again
        from the start after a crash, a retry or a durable wait."""
        raise NotImplementedError

    def route(self, output: OutT) -> Sequence[str] | None:
        """Agents to run next; None follows the pipeline, an empty list ends this branch.

        Several agents start parallel branches, each on this step's state; the
        workflow ends when no branch is open. A branch reaching a join agent waits
        there until every other branch has ended too.

        Name only agents of the pipeline or of ``routes`` (checked when the app
        loads); anything else fails the step with a non-retryable error.
        """
        return None

    def state_update(self, output: OutT) -> dict[str, Any]:
        """What this step adds to the workflow state (by default its output under its name)."""
        return {self.name: output.model_dump(mode="json")}
