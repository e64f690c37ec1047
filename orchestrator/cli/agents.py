"""``orchestrator agents``: live workers, their in-flight steps, each agent's queue and the
reconciler's leader, read from Redis only (Postgres is not needed, nor touched). The
agents are found in Redis (streams, workers' status), whichever app the workers run.

``--json`` prints one object, a stable shape for scripts (times are UTC ISO 8601,
durations in seconds)::

    {"workers": [{"name", "host", "pid", "app", "agents": [..], "concurrency",
                  "started_at", "uptime_seconds", "last_seen_seconds", "reconciler_leader",
                  "in_flight": [{"workflow_id", "step_id", "seq", "agent", "attempt",
                                 "started_at", "running_seconds"}]}],
     "agents": [{"name", "workers": [..], "in_flight", "group": GROUP | null}],
     "consolidation": GROUP | null,
     "reconciler": {"leader": name | null, "alive": bool, "ttl_ms": int | null}}

    GROUP = {"stream", "name", "lag", "pending", "last_delivered_id",
             "consumers": [{"name", "pending", "idle_ms", "alive"}]}

``lag`` counts entries not delivered yet, ``pending`` those delivered but not
acknowledged (running, or held by a dead worker until they are taken over).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

import anyio
import typer
from rich.table import Table

from orchestrator.cli.support import Options, guard, out
from orchestrator.connections import connect_redis, redis_errors
from orchestrator.coordination.keys import Keys
from orchestrator.coordination.overview import Group, Overview, overview
from orchestrator.coordination.status import WorkerStatus
from orchestrator.errors import ConfigurationError


@guard
def agents(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Live workers and their in-flight steps, lag and pending entries per agent, and who
    leads the reconciler (from Redis only)."""
    opts: Options = ctx.find_root().obj
    url = opts.settings.redis_url
    if url is None:
        raise ConfigurationError(
            "agents reads the workers' Redis: set REDIS_URL (an embedded Redis is private "
            "to one process, so no worker could be seen in it)"
        )

    async def read() -> Overview:
        settings = opts.settings
        client = await connect_redis(url, timeout=settings.redis_timeout_seconds)
        try:
            with redis_errors():
                return await overview(client, Keys(settings.key_prefix))
        finally:
            await client.aclose()

    seen = anyio.run(read)
    if as_json:
        out.print_json(data=as_data(seen, time.time()))
    else:
        print_overview(seen, time.time(), opts.settings.key_prefix)


def as_data(seen: Overview, now: float) -> dict[str, Any]:
    """The ``--json`` shape (see the module docstring); ``now`` in Unix seconds."""
    leader = seen.reconciler
    return {
        "workers": [
            _worker_data(w, now, leader is not None and leader.name == w.name) for w in seen.workers
        ],
        "agents": [
            {
                "name": agent,
                "workers": [w.name for w in seen.workers if agent in w.agents],
                "in_flight": _in_flight(seen, agent),
                "group": None if group is None else asdict(group),
            }
            for agent, group in seen.agents.items()
        ],
        "consolidation": None if seen.consolidation is None else asdict(seen.consolidation),
        "reconciler": {
            "leader": (leader.name or None) if leader else None,
            "alive": leader.alive if leader else False,
            "ttl_ms": leader.ttl_ms if leader else None,
        },
    }


def _worker_data(w: WorkerStatus, now: float, leads: bool) -> dict[str, Any]:
    return {
        "name": w.name,
        "host": w.host,
        "pid": w.pid,
        "app": w.app,
        "agents": list(w.agents),
        "concurrency": w.concurrency,
        "started_at": _iso(w.started_at),
        "uptime_seconds": round(max(now - w.started_at, 0.0), 3),
        "last_seen_seconds": round(max(now - w.updated_at, 0.0), 3),
        "reconciler_leader": leads,
        "in_flight": [
            {
                **asdict(step),
                "started_at": _iso(step.started_at),
                "running_seconds": round(max(now - step.started_at, 0.0), 3),
            }
            for step in w.in_flight
        ],
    }


def print_overview(seen: Overview, now: float, prefix: str) -> None:
    """The tables: workers, their in-flight steps, the agents' queues; then the leader."""
    if not seen.workers:
        out.print(f"no live workers (key prefix {prefix!r})", highlight=False)
    else:
        out.print(_workers_table(seen, now))
        if any(w.in_flight for w in seen.workers):
            out.print(_steps_table(seen, now))
    if seen.agents or seen.consolidation:
        out.print(_queues_table(seen))
    out.print(_leader_line(seen), highlight=False)


def _steps_table(seen: Overview, now: float) -> Table:
    table = _table(
        "in flight (as each worker last reported)",
        ("worker", "workflow", "step", "attempt", "running"),
    )
    for w in seen.workers:
        for i, s in enumerate(w.in_flight):
            table.add_row(
                w.name if i == 0 else "",
                s.workflow_id,
                f"{s.seq} {s.agent}",
                str(s.attempt),
                _duration(now - s.started_at),
                end_section=i == len(w.in_flight) - 1,
            )
    return table


def _workers_table(seen: Overview, now: float) -> Table:
    table = _table(
        f"{len(seen.workers)} live worker(s)",
        ("worker", "process", "agents", "in flight", "up", "seen"),
    )
    for w in seen.workers:
        table.add_row(
            w.name,
            f"{w.host}:{w.pid}",
            ", ".join(w.agents),
            f"{len(w.in_flight)}/{w.concurrency * len(w.agents)}",
            _duration(now - w.started_at),
            f"{_duration(now - w.updated_at)} ago",
        )
    return table


def _queues_table(seen: Overview) -> Table:
    table = _table(
        "queues (consumer groups)",
        ("group", "workers", "in flight", "lag", "pending", "held by dead workers"),
    )
    for agent, group in seen.agents.items():
        serving = sum(agent in w.agents for w in seen.workers)
        table.add_row(agent, str(serving), str(_in_flight(seen, agent)), *_group_cells(group))
    if seen.consolidation is not None:
        # Every worker that consolidates is a consumer of this group.
        consuming = sum(c.alive for c in seen.consolidation.consumers)
        table.add_row("consolidation", str(consuming), "", *_group_cells(seen.consolidation))
    return table


def _table(title: str, columns: tuple[str, ...]) -> Table:
    table = Table(title=title)
    for column in columns:
        # Folded, never cut: ids are what one copies into `orchestrator status`.
        table.add_column(column, overflow="fold")
    return table


def _group_cells(group: Group | None) -> tuple[str, str, str]:
    """Lag, pending, and the dead consumers still holding entries (taken over soon)."""
    if group is None:
        return "-", "-", "no stream yet"
    dead = ", ".join(f"{c.name}: {c.pending}" for c in group.consumers if c.pending and not c.alive)
    return str(group.lag), str(group.pending), dead


def _leader_line(seen: Overview) -> str:
    leader = seen.reconciler
    if leader is None:
        return "reconciler: no leader" + (
            " yet (elected within seconds among the workers that reconcile)" if seen.workers else ""
        )
    name = leader.name or "an unnamed holder"
    state = "alive" if leader.alive else "not alive: its lock lapses"
    return f"reconciler leader: {name} ({state}, lock {leader.ttl_ms / 1000:.1f}s left)"


def _in_flight(seen: Overview, agent: str) -> int:
    return sum(s.agent == agent for w in seen.workers for s in w.in_flight)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")


def _duration(seconds: float) -> str:
    """``4.2s``, ``12m05s``, ``3h07m``, ``2d04h``."""
    s = max(seconds, 0.0)
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h < 24 else f"{h // 24}d{h % 24:02d}h"
