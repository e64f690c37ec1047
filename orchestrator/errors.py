"""Every error the runtime raises derives from one root.

OrchestratorError
├── ConfigurationError      bad settings, a bad ``--app`` path, registry mistakes
├── ServiceUnavailable      the runtime's own Redis or Postgres call failed (infrastructure:
│                           waited out, never a step failure), or pgvector is missing
├── InvalidInput            a malformed ticket, envelope or cached value
├── WorkflowNotFound        no workflow with that id
└── StepError               raised while running one step (carries ids, ``retry_after``)
    ├── FenceRejected       the completion lost to a newer attempt or a closed step
    ├── NonDeterminismError a replay asked for a different tool or wait than was recorded
    ├── StepLimitReached    the workflow routed past its step limit (a loop?)
    ├── WaitTimedOut        ctx.wait_for() timed out: catch it to carry on without the signal
    ├── ToolError           a tool failed (``non_retryable`` says whether to retry)
    │   └── ToolNotApplied  raised by a non-idempotent tool: the remote certainly did nothing
    ├── BudgetExceeded      the tenant's model budget is spent: no more model calls (never
    │                       retried; carries ``tenant_id``, ``budget_usd``, ``spent_usd``)
    └── AgentError          raise from an agent; ``non_retryable`` skips retries

Control flow, not errors (BaseException, so an agent's ``except Exception`` cannot
swallow it, as Temporal does):

Parked                      ctx.ask(), ctx.wait_for(), ctx.sleep(): the step stops here and
                            runs again once the reply, signal or time has come
"""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID


class OrchestratorError(Exception):
    """Root of all runtime errors."""


class ConfigurationError(OrchestratorError):
    """Bad settings, a bad ``--app`` path, or an app set up wrong (unknown agents, a bad
    schedule)."""

    pass


class ServiceUnavailable(OrchestratorError):
    """``retryable``: the server may come back (unreachable, timed out), as opposed to a
    server that can never work (pgvector missing)."""

    def __init__(self, service: str, detail: str, *, retryable: bool = True) -> None:
        super().__init__(f"{service} unavailable: {detail}")
        self.service = service
        self.retryable = retryable


class InvalidInput(OrchestratorError):
    """A malformed ticket, envelope, command-line argument or cached value."""

    pass


class WorkflowNotFound(OrchestratorError):
    """No workflow with that id; the id is on ``workflow_id``."""

    def __init__(self, workflow_id: UUID | str) -> None:
        super().__init__(f"no workflow {workflow_id}")
        self.workflow_id = workflow_id


class Parked(BaseException):
    """The step waits, durably, without holding a worker: for the signal ``name``
    (``ctx.ask`` waits for ``"input"``), for ``delay`` seconds, or both (a timeout).

    ``due`` is an already recorded due time (epoch seconds) when a re-run parks again
    on the same wait; ``new`` says the wait is new and its due time must be recorded.
    """

    def __init__(
        self,
        *,
        name: str | None,
        delay: float | None,
        due: float | None = None,
        new: bool = True,
        question: str | None = None,
    ) -> None:
        what = f"signal {name!r}" if name else f"{delay}s"
        super().__init__(f"parked: waiting for {what}")
        self.name = name
        self.delay = delay
        self.due = due
        self.new = new
        self.question = question


class StepError(OrchestratorError):
    """An error tied to one step; ``non_retryable`` stops further attempts and
    ``retry_after`` (seconds: a rate limit's wait, a remote's Retry-After) is the least
    the backoff waits before the next one."""

    non_retryable: bool = False
    retry_after: float | None = None

    def __init__(
        self,
        message: str,
        *,
        workflow_id: UUID | None = None,
        step_id: UUID | None = None,
        agent: str | None = None,
        non_retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.workflow_id = workflow_id
        self.step_id = step_id
        self.agent = agent
        if non_retryable is not None:
            self.non_retryable = non_retryable
        if retry_after is not None:
            self.retry_after = retry_after


class FenceRejected(StepError):
    """This attempt lost its fence: a newer attempt took the step, or the step is already
    closed, so nothing it does may be committed. Never retried."""

    non_retryable = True


class NonDeterminismError(StepError):
    """A re-run asked for a different tool call or wait than the one recorded at that
    point, so the recorded results cannot be replayed. Never retried."""

    non_retryable = True


class StepLimitReached(StepError):
    """The workflow routed past its pipeline's step limit (a routing loop?). Never retried."""

    non_retryable = True


class WaitTimedOut(StepError):
    """``ctx.wait_for(name, timeout=...)`` saw no signal in time."""

    def __init__(self, name: str, timeout: float) -> None:
        super().__init__(f"no signal {name!r} within {timeout:g}s", non_retryable=True)
        self.name = name
        self.timeout = timeout


class ToolError(StepError):
    """A tool failed; ``tool`` names it and ``non_retryable`` says whether to retry."""

    def __init__(
        self,
        message: str,
        *,
        tool: str,
        non_retryable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, non_retryable=non_retryable, retry_after=retry_after)
        self.tool = tool


class BudgetExceeded(StepError):
    """The tenant's model budget (``orchestrator budget set``) is spent: the step may make
    no more model calls. Never retried: the workflow fails with this reason."""

    non_retryable = True

    def __init__(self, tenant_id: str, *, budget_usd: Decimal, spent_usd: Decimal) -> None:
        super().__init__(
            f"tenant {tenant_id!r} has spent its model budget "
            f"(${spent_usd:.4f} of ${budget_usd:.2f}); raise it with "
            f"`orchestrator budget set --tenant {tenant_id} --usd N`"
        )
        self.tenant_id = tenant_id
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd


class AgentError(StepError):
    """Raise from an agent to fail the step; ``non_retryable=True`` skips retries. The
    runtime raises it too (input or output that does not fit, a timeout, a failed model call)."""

    pass


class ToolNotApplied(ToolError):
    """Raise from a non-idempotent tool when the remote certainly did not apply the call
    (it refused, or the request never left). Any other exception from such a tool is
    *in doubt*: the effect may have happened, so it is never simply called again."""

    def __init__(self, message: str, *, tool: str = "", retry_after: float | None = None) -> None:
        super().__init__(message, tool=tool, retry_after=retry_after)


def first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception inside a (nested) task group's exception group: what a
    caller awaiting the work in turn would have seen."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first
