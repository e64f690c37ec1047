"""Recall for a running step: the session's cache in Redis, else Postgres.

The tenant, session and customer come from the step's ``StepInfo`` (the
workflow row), never from the caller. A recall sees the customer's memories
and the tenant-wide ones (customer ``""``). The cache is the runtime's
``recall_cache`` (see ``StepServices``), a field per query shape (``cache_field``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from uuid import UUID

from orchestrator import tracing
from orchestrator.step.info import StepInfo
from orchestrator.step.services import StepServices
from orchestrator.store.memory import Memory

log = logging.getLogger("orchestrator.recall")


@dataclass(frozen=True, slots=True)
class RecallResult:
    """What one recall returned (best first), how (``mode``: see ``store.memory.Recall``)
    and whether it came from the session's cache."""

    query: str
    memories: tuple[Memory, ...]
    mode: str
    cached: bool

    def record(self) -> dict[str, Any]:
        """The compact account kept on the step's record (why did the agent say that)."""
        return {
            "query": self.query,
            "mode": self.mode,
            "cached": self.cached,
            "memories": [
                {"id": m.id, "kind": m.kind, "key": m.key, "score": round(m.score, 6)}
                for m in self.memories
            ],
        }


async def recall_for_step(
    services: StepServices,
    info: StepInfo,
    query: str,
    *,
    k: int = 5,
    kinds: Sequence[str] | None = None,
) -> RecallResult:
    """The ``k`` memories of this step's customer (and tenant-wide ones) that best match
    ``query``, hybrid (vector and full text), from the session's cache when it is current.
    One span per recall (``memory.recall``: how many, how, whether cached; never the
    query's text, which may be personal)."""
    with tracing.child(
        services.tracer, "memory.recall", {"memory.k": k, "memory.kinds": list(kinds or [])}
    ) as span:
        found = await _recall(services, info, query, k=k, kinds=kinds)
        span.set_attribute("memory.cached", found.cached)
        span.set_attribute("memory.mode", found.mode)
        span.set_attribute("memory.count", len(found.memories))
        return found


async def _recall(
    services: StepServices,
    info: StepInfo,
    query: str,
    *,
    k: int,
    kinds: Sequence[str] | None,
) -> RecallResult:
    customers = list(dict.fromkeys([info.customer_id, ""]))
    embedder = services.embedder.name
    cache = services.recall_cache
    name = cache_field(query, k, kinds, embedder, customers)
    lookup = None
    if info.session_id:
        lookup = await cache.get(info.tenant_id, info.session_id, info.customer_id, name)
        if lookup.value is not None:
            cached = _load(lookup.value)
            if cached is not None:
                return RecallResult(query, cached[1], cached[0], cached=True)
    found = await services.store.memory.recall(
        tenant_id=info.tenant_id,
        customer_ids=customers,
        query=query,
        embedding=await services.embedder.embed(query),
        embedder=embedder,
        k=k,
        kinds=kinds,
        exact_limit=services.settings.recall_exact_limit,
    )
    if lookup is not None:
        value = {"mode": found.mode, "memories": [_dump(m) for m in found.memories]}
        await cache.put(info.tenant_id, info.session_id, name, lookup.versions, value)
    return RecallResult(query, found.memories, found.mode, cached=False)


def cache_field(
    query: str, k: int, kinds: Sequence[str] | None, embedder: str, customers: Sequence[str]
) -> str:
    """The recall cache field of one recall: a digest of everything that shapes its result."""
    shape = [query, k, sorted(kinds) if kinds is not None else None, embedder, list(customers)]
    return hashlib.blake2b(json.dumps(shape).encode(), digest_size=12).hexdigest()


def _dump(memory: Memory) -> dict[str, Any]:
    out = asdict(memory)
    for name in ("source_workflow", "source_step"):
        if out[name] is not None:
            out[name] = str(out[name])
    return out


_TYPES: dict[str, type | tuple[type, ...]] = {
    "id": int,
    "customer_id": str,
    "kind": str,
    "key": str,
    "content": str,
    "metadata": dict,
    "confidence": (int, float),
    "score": (int, float),
}


def _load(value: dict[str, Any]) -> tuple[str, tuple[Memory, ...]] | None:
    """A cached value back as memories; None (a miss) when it is not the shape ``_dump``
    wrote (an older release's entry, or a corrupt one)."""
    try:
        memories = []
        for item in value["memories"]:
            wrong = [name for name, kind in _TYPES.items() if not isinstance(item[name], kind)]
            if wrong:
                raise TypeError(f"wrong type of {', '.join(wrong)}")
            for name in ("source_workflow", "source_step"):
                if item[name] is not None:
                    item[name] = UUID(item[name])
            memories.append(Memory(**item))
        return str(value["mode"]), tuple(memories)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        log.warning("corrupt recall cache value (a miss): %r", exc)
        return None
