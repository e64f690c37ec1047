"""Every Redis key and channel name the runtime uses, built in one place.

Keys used together for one workflow share the ``{workflow_id}`` hash tag so
they land in one Redis Cluster slot. Nothing outside this module spells a key.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote
from uuid import UUID


def _part(value: str) -> str:
    """A tenant, session or customer id as one key segment: ``:``, ``{``, ``}``, ``%`` and
    the like are percent-encoded, so an id can neither reach into another tenant's
    namespace nor pick a Cluster hash tag."""
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Keys:
    """The key namespace; tests give each test its own ``prefix``."""

    prefix: str = "orch"

    def stream(self, agent: str) -> str:
        """The task stream of one agent; its consumer group is named after the agent."""
        return f"{self.prefix}:stream:{agent}"

    def streams(self) -> str:
        """SCAN pattern of every stream under this prefix (agents', dead letters, consolidation)."""
        return f"{self.prefix}:stream:*"

    def agent_of(self, stream: str) -> str | None:
        """The agent whose task stream is named ``stream``; None for any other key."""
        head = f"{self.prefix}:stream:"
        if not stream.startswith(head) or stream in (
            self.dead_letter_stream(),
            self.consolidation_stream(),
        ):
            return None
        return stream.removeprefix(head)

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

    def worker_status(self, consumer: str) -> str:
        """Live status hash of one worker (its agents, start time, in-flight steps)."""
        return f"{self.prefix}:worker:{consumer}"

    def workers(self) -> str:
        """Set of the workers that wrote a status hash (``orchestrator agents`` starts here);
        members whose hash expired are dropped by the reconciler."""
        return f"{self.prefix}:workers"

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

    def tenant(self, tenant: str) -> str:
        """The namespace of one tenant's keys (``forget`` and tests scan under it)."""
        return f"{self.prefix}:t:{_part(tenant)}"

    def working_memory(self, tenant: str, session: str) -> str:
        """Working memory of one session: one small versioned value, with a TTL."""
        return f"{self.tenant(tenant)}:wm:{{{_part(session)}}}"

    def recall_cache(self, tenant: str, session: str) -> str:
        """Recalled memories of one session, by query (a hash, with a TTL)."""
        return f"{self.tenant(tenant)}:recall:{{{_part(session)}}}"

    def memory_version(self, tenant: str, customer: str) -> str:
        """Bumped whenever a memory of the customer is written: cached recalls made
        before carry an older version and are not used."""
        return f"{self.tenant(tenant)}:memver:{_part(customer)}"

    def consolidation_stream(self) -> str:
        """Completed workflows to distil into long-term memory (consumer group
        ``consolidation``); rebuilt from Postgres by the reconciler when lost."""
        return f"{self.prefix}:stream:consolidation"

    @staticmethod
    def group(agent: str) -> str:
        """The consumer group of an agent's stream: named after the agent."""
        return agent
