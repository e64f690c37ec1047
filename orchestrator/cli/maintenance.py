"""Commands that change the database as a whole: migrate, prune, forget."""

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Annotated, Any
from uuid import UUID

import typer

from orchestrator.cli.support import activity, guard, out, run_body
from orchestrator.client import Client
from orchestrator.connections import redis_errors
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.store.erasure import Erasure, ErasureStore, refuse_unfinished


@guard
def migrate(ctx: typer.Context) -> None:
    """Apply database migrations (a no-op when up to date)."""

    async def body(runtime: Runtime) -> None:
        out.print(f"database schema {runtime.settings.db_schema!r} is up to date")

    run_body(ctx.obj, body)


@guard
def prune(
    ctx: typer.Context,
    older_than: Annotated[
        str, typer.Option("--older-than", help="finished longer ago than this: 30d, 12h, 90m, 45s")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="print the counts as JSON")] = False,
) -> None:
    """Delete finished workflows' history (checkpoints, events, attempts, tool runs,
    signals), and memories that decayed below ORCHESTRATOR_MEMORY_PRUNE_BELOW or outlived
    ORCHESTRATOR_MEMORY_RETENTION_DAYS.

    The workflows, their steps and outcomes, dead letters and transcripts stay.
    """
    seconds = parse_duration(older_than)

    async def body(runtime: Runtime) -> None:
        settings = runtime.settings
        with activity("pruning") as note:
            report = await runtime.store.prune(
                older_than_seconds=seconds,
                on_batch=lambda so_far: note(f"{so_far.workflows} workflows so far"),
            )
            note("decayed and expired memories")
            report += await runtime.store.prune_memories(
                half_life_days=settings.memory_half_life_days,
                prune_below=settings.memory_prune_below,
                retention_days=settings.memory_retention_days,
            )
        if as_json:
            out.print_json(data=asdict(report))
            return
        out.print(
            f"pruned {report.workflows} workflow(s) finished over {older_than} ago: "
            f"{report.checkpoints} checkpoints, {report.events} events, "
            f"{report.attempts} step attempts, {report.tool_runs} tool runs, "
            f"{report.signals} signals deleted; "
            f"{report.memories} decayed or expired memories deleted",
            highlight=False,
        )

    run_body(ctx.obj, body)


@guard
def forget(
    ctx: typer.Context,
    tenant: Annotated[str, typer.Option("--tenant", help="the customer's tenant")],
    customer: Annotated[str, typer.Option("--customer", help="the customer id")],
    cancel: Annotated[
        bool, typer.Option("--cancel", help="cancel the customer's unfinished workflows first")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the audit record as JSON")] = False,
) -> None:
    """Erase one customer of one tenant: transcripts, memories, workflow payloads, tool
    results, working memory and caches. Writes an audit record without personal data.

    Refused while a workflow of the customer is unfinished, unless --cancel.
    """
    if not yes:
        typer.confirm(
            f"Erase everything of customer {customer!r} of tenant {tenant!r}? "
            "This cannot be undone",
            abort=True,
        )

    async def body(runtime: Runtime) -> None:
        with activity("forgetting") as note:
            erasure = await forget_customer(runtime, tenant, customer, cancel=cancel, note=note)
        if as_json:
            out.print_json(
                data={
                    "erasure_id": str(erasure.erasure_id),
                    "tenant_id": erasure.tenant_id,
                    "counts": dict(erasure.counts),
                }
            )
            return
        counts = ", ".join(f"{n} {table}" for table, n in erasure.counts.items())
        out.print(f"erasure {erasure.erasure_id} of tenant {tenant}: {counts}", highlight=False)

    run_body(ctx.obj, body)


async def forget_customer(
    runtime: Runtime,
    tenant: str,
    customer: str,
    *,
    cancel: bool = False,
    note: Callable[[str], None] = lambda _: None,
) -> Erasure:
    """Erase ``customer`` of ``tenant`` from Redis and Postgres (see store.erasure).

    Redis first (its keys, the stream entries and delayed retries of the customer's
    finished workflows), so a Redis failure leaves Postgres as it was and a second run
    finds everything again; then Postgres in one transaction, writing the audit; then
    the keys once more, in case a racing write (a consolidation's version bump) made one.
    ``note`` hears which of these it is at.
    """
    store = ErasureStore(runtime.db)
    note("finding the customer's sessions and workflows")
    plan = await store.plan(tenant_id=tenant, customer_id=customer)
    if plan.unfinished and cancel:
        note(f"cancelling {len(plan.unfinished)} unfinished workflow(s)")
        client = Client(runtime)
        # Queued ones first: cancelling a running one starts the next queued of its session.
        for wid in sorted(plan.unfinished, key=lambda w: plan.workflows[w] != "queued"):
            await client.cancel(wid)
        plan = await store.plan(tenant_id=tenant, customer_id=customer)
    refuse_unfinished(plan)
    note(f"deleting Redis keys and stream entries of {len(plan.workflows)} workflow(s)")
    with redis_errors():
        keys_deleted = await _delete_customer_keys(runtime, tenant, customer, plan.sessions)
        entries = await _delete_stream_entries(runtime, plan.workflows)
    note("erasing in Postgres (one transaction)")
    erasure = await store.erase(
        tenant_id=tenant,
        customer_id=customer,
        extra_counts={"redis_keys": keys_deleted, "redis_entries": entries},
    )
    with redis_errors():
        await _delete_customer_keys(runtime, tenant, customer, erasure.plan.sessions)
    return erasure


async def _delete_customer_keys(
    runtime: Runtime, tenant: str, customer: str, sessions: Sequence[str]
) -> int:
    k = runtime.keys
    names = [k.memory_version(tenant, customer)]
    for session in sessions:
        names += [k.working_memory(tenant, session), k.recall_cache(tenant, session)]
    return int(await runtime.redis.delete(*names))


async def _delete_stream_entries(runtime: Runtime, workflows: Iterable[UUID]) -> int:
    """Entries (of the agents' streams, the dead-letter and consolidation streams) and
    delayed retries that carry one of ``workflows``: their envelopes hold payloads."""
    ids = [str(w).encode() for w in workflows]
    if not ids:
        return 0

    def mentions(value: Any) -> bool:
        raw = value if isinstance(value, bytes) else str(value).encode()
        return any(i in raw for i in ids)

    k, redis = runtime.keys, runtime.redis
    deleted = 0
    streams = [k.stream(a) for a in runtime.app.agents]
    for stream in [*streams, k.dead_letter_stream(), k.consolidation_stream()]:
        start: bytes | str = "-"
        while True:
            page: Any = await redis.xrange(stream, min=start, max="+", count=_PAGE)
            doomed = [i for i, fields in page if any(mentions(v) for v in fields.values())]
            if doomed:
                deleted += int(await redis.xdel(stream, *doomed))
            if len(page) < _PAGE:
                break
            start = b"(" + page[-1][0]
    async for member, _ in redis.zscan_iter(k.delayed(), count=_PAGE):
        if mentions(member):
            deleted += int(await redis.zrem(k.delayed(), member))
    return deleted


_PAGE = 500


_DURATION = re.compile(r"([+-]?\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_DURATION_SECONDS = 100 * 365 * 86400


def parse_duration(value: str) -> int:
    """``30d``, ``12h``, ``90m`` or ``45s`` as seconds; InvalidInput for anything else."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise InvalidInput(f"not a duration: {value!r} (use a number and s, m, h or d: 30d, 12h)")
    seconds = int(match[1]) * _UNIT_SECONDS[match[2]]
    if not 0 < seconds <= _MAX_DURATION_SECONDS:
        raise InvalidInput(f"duration out of range: {value!r} (more than zero, at most 100 years)")
    return seconds
