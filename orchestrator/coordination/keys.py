"""Every Redis key and channel name the runtime uses, built in one place.

Keys used together for one workflow share the ``{workflow_id}`` hash tag so
they land in one Redis Cluster slot. Nothing outside this module spells a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Keys:
    """The key namespace; tests give each test its own ``prefix``."""

    prefix: str = "orch"

    def stream(self, agent: str) -> str:
        """The task stream of one agent; its consumer group is named after the agent."""
        return f"{self.prefix}:stream:{agent}"

    def dead_letter_stream(self) -> str:
        """Stream of entries that could not be processed or ran out of attempts (a view;
        the durable dead letters are rows in Postgres)."""
        return f"{self.prefix}:stream:dead-letter"

    def delayed(self) -> str:
        """Sorted set of retry envelopes scored by their due time (a speed-up only)."""
        return f"{self.prefix}:delayed"

    def reconciler_lock(self) -> str:
        """Held by the one reconciler leader."""
        return f"{self.prefix}:lock:reconciler"

    def rate_bucket(self, tenant: str) -> str:
        """Token bucket limiting one tenant's model calls."""
        return f"{self.prefix}:rate:model:{{{tenant}}}"

    def agent_status(self, agent: str, consumer: str) -> str:
        """Live status hash of one agent instance (a worker consumer)."""
        return f"{self.prefix}:agent:{agent}:{consumer}"

    def worker_alive(self, consumer: str) -> str:
        """Present while the worker (stream consumer) is alive: a short TTL it refreshes."""
        return f"{self.prefix}:alive:{consumer}"

    def step_lock(self, workflow_id: UUID, seq: int) -> str:
        """The lease of one step: held by the worker running it."""
        return f"{self.prefix}:lock:{{{workflow_id}}}:{seq}"

    def signal_channel(self) -> str:
        """Pub/Sub channel announcing finished workflows (a nudge only)."""
        return f"{self.prefix}:signal:finished"

    def progress_channel(self) -> str:
        """Pub/Sub channel announcing every step handoff (for live views)."""
        return f"{self.prefix}:signal:progress"

    @staticmethod
    def group(agent: str) -> str:
        """The consumer group of an agent's stream: named after the agent."""
        return agent
