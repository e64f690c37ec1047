"""The Python API: submit workflows, signal, cancel and resume them, follow them."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Collection, Iterable, Mapping
from functools import partial
from typing import Any
from uuid import UUID

import anyio
from pydantic import BaseModel, ValidationError

from orchestrator import tracing
from orchestrator.connections import REDIS_DOWN
from orchestrator.coordination import status as live
from orchestrator.coordination import streams
from orchestrator.coordination.locks import owner_of
from orchestrator.errors import InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.schemas import Signal, StepStatus, WorkflowRecord, WorkflowStatus
from orchestrator.schemas.story import Story
from orchestrator.step.context import INPUT_SIGNAL
from orchestrator.store import workflows
from orchestrator.store.dead_letters import DeadLetter


class Client:
    """The Python API of a deployment: submit, signal, cancel, resume, follow and inspect
    workflows."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    async def submit(
        self,
        pipeline: str | None,
        input: BaseModel | Mapping[str, Any],
        *,
        tenant: str | None = None,
        session: str | None = None,
        customer: str | None = None,
        key: str | None = None,
    ) -> UUID:
        """Start a workflow of ``pipeline`` (None: the app's default) on ``input``.

        The input is validated against the pipeline's ``input_model``. An input
        carrying ``tenant_id``, ``session_id`` or ``customer_id`` fields (as the support
        ``Ticket`` does) supplies them when the arguments are not given. Workflows of
        one session run one at a time, in order, and share its transcript.

        Postgres decides (the commit is the acceptance); then the first step is
        enqueued. With ``key`` (an idempotency key, per tenant) a retried submission
        returns the workflow the first one created: retry freely after a timeout.
        Whatever a submission failed to enqueue, the reconciler does.
        """
        declared = self.rt.app.resolve_pipeline(pipeline)
        tenant = tenant or _field(input, "tenant_id") or "default"
        with tracing.span(
            self.rt.tracer, "workflow.submit", pipeline=declared.name, tenant=tenant
        ) as submit_span:
            submission = workflows.Submission(
                pipeline=declared.name,
                first_agent=declared.agents[0],
                state={declared.input_key: declared.validate_input(input)},
                message=str(input) if isinstance(input, BaseModel) else json.dumps(input),
                tenant=tenant,
                session=session or _field(input, "session_id"),
                customer=customer or _field(input, "customer_id") or "anonymous",
                app_version=self.rt.app.version,
                key=key,
                traceparent=tracing.traceparent_of(submit_span),
                consolidate=self.rt.app.consolidates(declared.name),
            )
            created = await self.rt.store.submit(submission)
            submit_span.set_attribute("workflow.id", str(created.envelope.workflow_id))
        if not created.queued:  # a queued one is enqueued when its session frees up
            await self.rt.pipelined(
                partial(streams.enqueue_in, keys=self.rt.keys, envelope=created.envelope)
            )
        return created.envelope.workflow_id

    async def cancel(self, workflow_id: UUID) -> bool:
        """Cancel an unfinished workflow (False if it had already finished).

        No new step starts; a running step sees it through ``ctx.cancelled()``
        and its completion hands off to nobody. The next ticket of its session starts.
        """
        promoted = await self.rt.store.cancel(workflow_id)
        for envelope in promoted or []:
            await streams.enqueue(self.rt.redis, self.rt.keys, envelope)
        return promoted is not None

    async def resume(self, workflow_id: UUID) -> int:
        """Re-run a failed or stuck workflow from its last checkpoint; return steps enqueued."""
        envelopes = await self.rt.store.resume(workflow_id)
        for envelope in envelopes:
            await streams.enqueue(self.rt.redis, self.rt.keys, envelope)
        return len(envelopes)

    async def signal(self, workflow_id: UUID, name: str, payload: Any = None) -> bool:
        """Send the signal ``name`` (any JSON payload) to a workflow; return whether a
        step was waiting for it (and resumes now).

        Recorded in Postgres first: a signal sent before the workflow waits is kept
        and taken by its next ``ctx.wait_for(name)``. A lost wake-up (Redis down) is
        re-enqueued by the reconciler.
        """
        if not name.strip():
            raise InvalidInput("the signal needs a name")
        return await self._signal(workflow_id, name, payload, None)

    async def provide_input(self, workflow_id: UUID, text: str) -> None:
        """Deliver a person's reply (the signal ``"input"``, which ``ctx.ask`` waits for);
        it is also added to the session transcript."""
        if not text.strip():
            raise InvalidInput("the reply is empty")
        await self._signal(workflow_id, INPUT_SIGNAL, text, ("customer", "customer", text))

    async def _signal(
        self, workflow_id: UUID, name: str, payload: Any, transcript: tuple[str, str, str] | None
    ) -> bool:
        envelope = await self.rt.store.signal(workflow_id, name, payload, transcript)
        if envelope is None:
            return False
        await streams.enqueue(self.rt.redis, self.rt.keys, envelope)
        signal = Signal(workflow_id=workflow_id, status=WorkflowStatus.RUNNING, seq=envelope.seq)
        await self.rt.redis.publish(self.rt.keys.progress_channel(), signal.model_dump_json())
        return True

    async def dead_letters(
        self, *, include_retried: bool = False, limit: int = 50
    ) -> list[DeadLetter]:
        """Dead letters, newest first (unretried only, unless ``include_retried``)."""
        return await self.rt.store.dead_letters(include_retried=include_retried, limit=limit)

    async def dead_letter(self, letter_id: int) -> DeadLetter:
        """One dead letter; InvalidInput if there is none with that id."""
        letter = await self.rt.store.dead_letter(letter_id)
        if letter is None:
            raise InvalidInput(f"no dead letter {letter_id}")
        return letter

    async def retry_dead_letter(self, letter_id: int) -> UUID:
        """Retry a dead-lettered step by resuming its workflow; return the workflow id."""
        letter = await self.dead_letter(letter_id)
        if letter.retried_at is not None:
            raise InvalidInput(f"dead letter {letter_id} was already retried")
        if letter.workflow_id is None:
            raise InvalidInput(
                f"dead letter {letter_id} is an unreadable entry with no workflow; "
                "fix its producer and submit again"
            )
        workflow_id: UUID = letter.workflow_id
        await self.resume(workflow_id)
        return workflow_id

    async def runs(
        self,
        *,
        status: WorkflowStatus | None = None,
        tenant: str | None = None,
        limit: int = 20,
        order: workflows.RunOrder = workflows.RunOrder.CREATED,
    ) -> list[dict[str, Any]]:
        """Workflows, newest first (or costliest first: ``order=RunOrder.COST``)."""
        return await self.rt.store.recent(
            status=status.value if status else None, tenant=tenant, limit=limit, order=order
        )

    async def watch(self) -> AsyncIterator[Signal]:
        """Live progress and completion signals (Pub/Sub: a view, not a durable feed)."""
        pubsub = self.rt.redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.rt.keys.progress_channel(), self.rt.keys.signal_channel())
        try:
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                try:
                    yield Signal.model_validate_json(message["data"])
                except ValidationError:
                    continue  # not ours or garbled: a view can skip it
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def leases(self, record: WorkflowRecord) -> dict[UUID, str]:
        """Who runs each open step of ``record``, as Redis knows it: ``running on W``,
        ``taken over soon`` (its worker is gone), or ``in the queue``. Empty when Redis
        cannot be reached (Postgres alone cannot tell a live lease from a dead one)."""
        open_steps = [s for s in record.steps if s.status is StepStatus.QUEUED]
        if not open_steps:
            return {}
        rt = self.rt
        try:
            pipe = rt.redis.pipeline(transaction=False)  # one round trip for every open step
            for step in open_steps:
                pipe.get(rt.keys.step_lock(record.id, step.seq))
            held: list[Any] = await pipe.execute()
            owners = [owner_of(h) if h is not None else "" for h in held]
            named = [o for o in owners if o]
            alive = dict(zip(named, await live.alive(rt.redis, rt.keys, named), strict=True))
        except REDIS_DOWN:
            return {}
        seconds = round(rt.settings.stall_after)
        found: dict[UUID, str] = {}
        for step, owner in zip(open_steps, owners, strict=True):
            if not owner:
                found[step.id] = f"in the {step.agent} queue, no worker holds it"
            elif alive[owner]:
                found[step.id] = f"running on {owner}"
            else:
                found[step.id] = (
                    f"its worker {owner} is gone: another takes it over within ~{seconds}s"
                )
        return found

    async def resolve(self, prefix: str) -> UUID:
        """The whole id of the one workflow whose id starts with ``prefix`` (any case,
        with or without dashes); InvalidInput when none does, several do, or it cannot
        start an id."""
        return await self.rt.store.resolve_workflow(prefix)

    async def story(self, workflow_id: UUID) -> Story:
        """The whole story of a workflow: steps, attempts, tool calls (executed or
        replayed), model use and cost, recalls, waits, signals, errors and their retry
        decisions, output (``orchestrator.schemas.story``); WorkflowNotFound if unknown."""
        return await self.rt.store.story(workflow_id)

    async def get(self, workflow_id: UUID) -> WorkflowRecord:
        """A workflow with its steps, as Postgres has it; WorkflowNotFound if unknown."""
        return await self.rt.store.workflow(workflow_id)

    async def wait(
        self,
        workflow_ids: Iterable[UUID],
        *,
        timeout: float | None = None,
        poll: float = 0.5,
        until: Collection[WorkflowStatus] = workflows.TERMINAL,
    ) -> dict[UUID, WorkflowStatus]:
        """Wait until every workflow is terminal (or, with ``until``, in one of those
        statuses: ``SETTLED`` also stops at a workflow waiting for input or a signal).
        Raises TimeoutError after ``timeout`` seconds.

        Postgres decides. A Pub/Sub signal of one of those statuses makes us check that
        workflow at once; every ``poll`` seconds all pending ones are checked, so a lost
        signal only costs latency.
        """
        pending = set(workflow_ids)
        result: dict[UUID, WorkflowStatus] = {}
        channels = [self.rt.keys.signal_channel()]  # terminal signals
        if any(not s.terminal for s in until):
            channels.append(self.rt.keys.progress_channel())
        async with self.rt.subscriptions.subscribed(channels) as pubsub:
            with anyio.fail_after(timeout if timeout is not None else math.inf):
                to_check, next_full = set(pending), 0.0
                while pending:
                    if anyio.current_time() >= next_full:
                        to_check, next_full = set(pending), anyio.current_time() + poll
                    if to_check:
                        done = await self.rt.store.terminal(list(to_check), until)
                        result.update(done)
                        pending.difference_update(done)
                    if not pending:
                        break  # all there: no reason to wait for the next poll
                    to_check = await _signals(pubsub, pending, until, next_full)
        return result


# What ``wait(until=SETTLED)`` stops at: finished, or waiting for a person or a signal.
SETTLED = frozenset({*workflows.TERMINAL, WorkflowStatus.WAITING})


async def _signals(
    pubsub: Any, pending: set[UUID], statuses: Collection[WorkflowStatus], until: float
) -> set[UUID]:
    """Pending workflows announced in one of ``statuses``, as soon as one is (with any
    already buffered after it), or none at ``until``."""
    found: set[UUID] = set()
    while (left := until - anyio.current_time()) > 0:
        # Once one is found, only drain what is already buffered: never linger.
        message = await pubsub.get_message(timeout=0 if found else left)
        if message is None:
            if found:
                return found
            continue
        try:
            signal = Signal.model_validate_json(message["data"])
        except ValidationError:
            continue  # a nudge only: a bad one is ignored, the poll still runs
        if signal.status in statuses and signal.workflow_id in pending:
            found.add(signal.workflow_id)
    return found


def _field(value: BaseModel | Mapping[str, Any], name: str) -> str | None:
    """A routing field (tenant, session, customer) the input itself carries, if any."""
    found = value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)
    return found if isinstance(found, str) and found else None
