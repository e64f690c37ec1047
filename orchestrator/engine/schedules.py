"""Cron schedules: submit a workflow once per cron tick, however many runtimes tick.

``app.schedule("nightly-digest", cron="0 2 * * *", pipeline="digest", input=...)``
declares a schedule (``orchestrator.store.schedules.Schedule``: five-field cron,
read in the schedule's ``timezone``, UTC by default); ``tick(runtime)``, called on
every reconciler pass, submits what is due.

Exactly once. A tick's workflow is submitted with the idempotency key
``schedule:{name}:{tick in UTC, ISO 8601}``, unique per tenant in Postgres: two
runtimes ticking at once, or a tick retried after a crash between the submission
and recording the tick as handled, get the same workflow back. ``last_tick``
(the latest tick handled, in Postgres) only ever moves forward.

Catch-up policy, for ticks that passed while nothing ran:

- A schedule never fires for ticks before it was first seen: on first sight the
  latest tick at or before now is recorded as handled, so deploying a schedule
  starts no burst (and does not run the tick that just passed).
- ``catch_up="latest"`` (the default): ticks missed while the runtime was down
  collapse into ONE run, for the most recent missed tick (as a Kubernetes CronJob
  with a starting deadline, or Celery beat, do).
- ``catch_up="all"``: each missed tick gets its own run, oldest first, bounded to
  the most recent ``MAX_CATCH_UP`` (100) of them; older ones are skipped.

A tick is due once ``now`` reaches it (at or before now). Changing a schedule's
expression in code keeps its last tick: the ticks of the new expression after it
are due (under "latest", at most one run for the change itself).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from uuid import UUID

from orchestrator.app import App
from orchestrator.client import Client
from orchestrator.errors import ConfigurationError, InvalidInput
from orchestrator.runtime import Runtime
from orchestrator.store.schedules import Schedule

log = logging.getLogger("orchestrator.schedules")


def check(app: App, schedule: Schedule) -> None:
    """ConfigurationError if ``schedule`` names an unknown pipeline of ``app`` or its
    input does not fit that pipeline."""
    if schedule.pipeline not in app.pipelines:
        known = ", ".join(sorted(app.pipelines)) or "none"
        raise ConfigurationError(
            f"schedule {schedule.name!r} names unknown pipeline {schedule.pipeline!r} (has {known})"
        )
    try:
        app.pipelines[schedule.pipeline].validate_input(schedule.input)
    except InvalidInput as exc:
        raise ConfigurationError(f"schedule {schedule.name!r}: {exc}") from exc


async def tick(runtime: Runtime, *, now: datetime | None = None) -> list[UUID]:
    """Submit every workflow the app's schedules have due at ``now`` (default: the clock).

    For each schedule: on first sight, record the latest tick at or before now as
    handled and submit nothing; otherwise submit the due ticks (see this module's
    catch-up policy), each under its idempotency key, and record each as handled
    once submitted. Safe to call from any number of runtimes at once, and again
    after a crash at any point. Returns the ids of the workflows submitted,
    including ones an earlier submission of the same tick had created.

    Every schedule is checked first (``ConfigurationError`` for an unknown pipeline
    or an input that does not fit it), so a mistake submits nothing.
    """
    when = datetime.now(UTC) if now is None else now
    if when.tzinfo is None:
        raise InvalidInput("tick(now=...) needs a timezone-aware datetime")
    declared = list(runtime.app.schedules.values())
    for schedule in declared:
        check(runtime.app, schedule)
    client = Client(runtime)
    submitted: list[UUID] = []
    for schedule in declared:
        submitted += await _tick_one(runtime, client, schedule, when)
    return submitted


async def _tick_one(
    runtime: Runtime, client: Client, schedule: Schedule, now: datetime
) -> list[UUID]:
    latest = schedule.latest(now)
    last = await runtime.store.sight_schedule(schedule.name, schedule.cron, latest or now)
    if last is None:  # a row without a tick (made by hand): first sight again
        await runtime.store.advance_schedule(schedule.name, latest or now)
        return []
    submitted: list[UUID] = []
    for due in schedule.due(last, now):
        workflow_id = await client.submit(
            schedule.pipeline, schedule.input, tenant=schedule.tenant, key=schedule.key(due)
        )
        # A crash here leaves the tick unrecorded: the next tick submits it again under
        # the same key and gets this workflow back.
        await runtime.store.advance_schedule(schedule.name, due)
        log.info("schedule %s: workflow %s for tick %s", schedule.name, workflow_id, due)
        submitted.append(workflow_id)
    return submitted
