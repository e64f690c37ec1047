"""The runtime's OpenTelemetry instruments, created from a Meter passed in (no-op without one).

Counters and histograms are recorded in process where things happen (no Redis or
Postgres call of their own, so the hot path stays as it was); the stream gauges
report the last measurement a worker took (XINFO GROUPS every few seconds, see
``orchestrator.engine.worker``). Every name starts with ``orchestrator.``:

=======================================  =========  ==========================================
instrument                               kind       attributes
=======================================  =========  ==========================================
orchestrator.step.duration (s)           histogram  agent, outcome (completed, retried,
                                                    failed, waiting, superseded)
orchestrator.step.attempts               counter    agent (every execution that ran the agent)
orchestrator.step.retries                counter    agent (a failure scheduled for retry)
orchestrator.dead_letters                counter    agent
orchestrator.stream.lag                  gauge      group (entries not yet delivered)
orchestrator.stream.pending              gauge      group (delivered, not acknowledged)
orchestrator.reconciler.requeues         counter    agent
orchestrator.tool.calls                  counter    tool, replayed (a recorded result returned)
orchestrator.model.calls                 counter    tenant, model
orchestrator.model.tokens                counter    tenant, model, type (prompt, completion)
orchestrator.model.cost (USD)            counter    tenant, model
orchestrator.takeover.duration (s)       histogram  agent, via (reclaim, requeue): from the
                                                    dead execution's last sign of life
=======================================  =========  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Literal

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeter, Observation

StepOutcome = Literal["completed", "retried", "failed", "waiting", "superseded"]
Takeover = Literal["reclaim", "requeue"]
# Histogram buckets in seconds (the SDK's defaults are made for milliseconds).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TAKEOVER_BUCKETS = (0.5, 1, 2, 3, 5, 10, 15, 30, 60, 120, 300, 600)


class Metrics:
    """The instruments of one runtime. ``enabled`` is False on the no-op meter: callers
    skip measurements that cost a query (the stream and consolidation gauges)."""

    def __init__(self, meter: Meter | None = None) -> None:
        self.enabled = meter is not None
        self.meter: Meter = meter or NoOpMeter("orchestrator")
        m = self.meter
        self._backlog: dict[str, tuple[int, int]] = {}  # group -> (lag, pending), last read
        self.step_duration = m.create_histogram(
            "orchestrator.step.duration",
            unit="s",
            description="time to run and commit a step",
            explicit_bucket_boundaries_advisory=STEP_BUCKETS,
        )
        self.step_attempts = m.create_counter(
            "orchestrator.step.attempts", unit="{attempt}", description="step executions started"
        )
        self.retries = m.create_counter(
            "orchestrator.step.retries", unit="{retry}", description="failures retried later"
        )
        self.dead_letters = m.create_counter(
            "orchestrator.dead_letters", unit="{letter}", description="steps and entries given up"
        )
        self.requeues = m.create_counter(
            "orchestrator.reconciler.requeues",
            unit="{step}",
            description="open steps nobody had, re-enqueued by the reconciler",
        )
        self.tool_calls = m.create_counter(
            "orchestrator.tool.calls",
            unit="{call}",
            description="tool calls: executed, or replayed from the ledger",
        )
        self._model_calls = m.create_counter(
            "orchestrator.model.calls", unit="{call}", description="model calls"
        )
        self._model_tokens = m.create_counter(
            "orchestrator.model.tokens", unit="{token}", description="model tokens used"
        )
        self._model_cost = m.create_counter(
            "orchestrator.model.cost", unit="USD", description="priced cost of model calls"
        )
        self.takeover_duration = m.create_histogram(
            "orchestrator.takeover.duration",
            unit="s",
            description="from a dead or stalled execution's last sign of life to its takeover",
            explicit_bucket_boundaries_advisory=TAKEOVER_BUCKETS,
        )
        m.create_observable_gauge(
            "orchestrator.stream.lag",
            callbacks=[self._observe(0)],
            unit="{entry}",
            description="entries of an agent's stream not yet delivered to its group",
        )
        m.create_observable_gauge(
            "orchestrator.stream.pending",
            callbacks=[self._observe(1)],
            unit="{entry}",
            description="entries delivered to an agent's group and not acknowledged",
        )

    def step_ended(self, agent: str, outcome: StepOutcome, seconds: float) -> None:
        """One execution of ``agent`` ended (run and committed) after ``seconds``."""
        self.step_duration.record(seconds, {"agent": agent, "outcome": outcome})

    def tool_call(self, tool: str, *, replayed: bool) -> None:
        """A tool call: ``replayed`` when the ledger returned a recorded result."""
        self.tool_calls.add(1, {"tool": tool, "replayed": replayed})

    def record_model_call(
        self,
        tenant: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
    ) -> None:
        """One model call of ``tenant``: its tokens and priced cost."""
        attributes = {"tenant": tenant, "model": model}
        self._model_calls.add(1, attributes)
        self._model_tokens.add(prompt_tokens, {**attributes, "type": "prompt"})
        self._model_tokens.add(completion_tokens, {**attributes, "type": "completion"})
        self._model_cost.add(cost_usd, attributes)

    def took_over(self, agent: str, via: Takeover, seconds: float) -> None:
        """A step was taken over ``seconds`` after its last execution was last seen alive."""
        self.takeover_duration.record(max(seconds, 0.0), {"agent": agent, "via": via})

    def observe_streams(self, backlog: Mapping[str, tuple[int, int]]) -> None:
        """The latest (lag, pending) per consumer group, reported by the stream gauges."""
        self._backlog.update(backlog)

    def _observe(self, index: int) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(v[index], {"group": g}) for g, v in self._backlog.items()]

        return observe
