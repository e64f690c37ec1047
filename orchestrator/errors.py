"""Every error the runtime raises derives from one root.

OrchestratorError
├── ConfigurationError      bad settings, a bad ``--app`` path, registry mistakes
├── ServiceUnavailable      the runtime's own Redis or Postgres call failed (infrastructure:
│                           waited out, never a step failure), or pgvector is missing
├── InvalidInput            a malformed ticket, envelope or cached value
├── WorkflowNotFound        no workflow with that id
├── InputNeeded             control flow: ctx.ask() parks the step until a reply
└── StepError               raised while running one step (carries ids)
    ├── FenceRejected       the completion lost to a newer attempt or a closed step
    ├── NonDeterminismError a replay asked for a different tool than was recorded
    ├── ToolError           a tool failed (``non_retryable`` says whether to retry)
    │   └── ToolNotApplied  raised by a non-idempotent tool: the remote certainly did nothing
    └── AgentError          raise from an agent; ``non_retryable`` skips retries
"""

from __future__ import annotations

from uuid import UUID


class OrchestratorError(Exception):
    """Root of all runtime errors."""


class ConfigurationError(OrchestratorError):
    pass


class ServiceUnavailable(OrchestratorError):
    """``retryable``: the server may come back (unreachable, timed out), as opposed to a
    server that can never work (pgvector missing)."""

    def __init__(self, service: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(f"{service} unavailable: {detail}")
        self.service = service
        self.retryable = retryable


class InvalidInput(OrchestratorError):
    pass


class WorkflowNotFound(OrchestratorError):
    def __init__(self, workflow_id: UUID | str) -> None:
        super().__init__(f"no workflow {workflow_id}")
        self.workflow_id = workflow_id


class InputNeeded(OrchestratorError):
    """Raised by ``ctx.ask`` when no reply exists yet: the workflow waits for one."""

    def __init__(self, question: str) -> None:
        super().__init__(f"waiting for input: {question}")
        self.question = question


class StepError(OrchestratorError):
    """An error tied to one step; ``non_retryable`` stops further attempts."""

    non_retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        workflow_id: UUID | None = None,
        step_id: UUID | None = None,
        agent: str | None = None,
        non_retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id
        self.step_id = step_id
        self.agent = agent
        if non_retryable is not None:
            self.non_retryable = non_retryable


class FenceRejected(StepError):
    non_retryable = True


class NonDeterminismError(StepError):
    non_retryable = True


class ToolError(StepError):
    def __init__(self, message: str, *, tool: str, non_retryable: bool = False) -> None:
        super().__init__(message, non_retryable=non_retryable)
        self.tool = tool


class AgentError(StepError):
    pass


class ToolNotApplied(ToolError):
    """Raise from a non-idempotent tool when the remote certainly did not apply the call
    (it refused, or the request never left). Any other exception from such a tool is
    *in doubt*: the effect may have happened, so it is never simply called again."""

    def __init__(self, message: str, *, tool: str = "") -> None:
        super().__init__(message, tool=tool)
