"""Cron schedules: what one is, and the last tick each one has handled.

A ``Schedule`` is declared in code (``App.schedule``) and holds the cron arithmetic:
its ticks, which are due, and each tick's idempotency key. It lives here, below the
app and the engine, so that both can import it without an import cycle. Postgres
keeps only what must survive a restart: per schedule name, the latest tick already
handled (``last_tick``). Every tick at or before it counts as done; the tick engine
(``orchestrator.engine.schedules``, which states the catch-up policy) submits the
ones after it and then moves it forward, never backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel

from orchestrator.errors import ConfigurationError
from orchestrator.store import Conn

CatchUp = Literal["latest", "all"]
MAX_CATCH_UP = 100  # catch_up="all": at most this many missed ticks are submitted
CRON_FIELDS = 5

SELECT_SCHEDULE = "SELECT cron, last_tick FROM schedules WHERE name = $1"
# First sight. DO UPDATE (a no-op) rather than DO NOTHING: it returns the row even when
# a concurrent first sight inserted it after this statement's snapshot.
INSERT_SCHEDULE = """
INSERT INTO schedules (name, cron, last_tick) VALUES ($1, $2, $3)
ON CONFLICT (name) DO UPDATE SET name = schedules.name
RETURNING last_tick
"""
# The expression changed in code: recorded for operators; the last tick stays.
UPDATE_CRON = "UPDATE schedules SET cron = $2, updated_at = now() WHERE name = $1"
# Only forward: a ticker that read an older last tick, or runs on a slow clock,
# can never move it back.
ADVANCE = """
UPDATE schedules SET last_tick = $2, updated_at = now()
WHERE name = $1 AND (last_tick IS NULL OR last_tick < $2)
"""
LIST_SCHEDULES = "SELECT name, cron, last_tick, updated_at FROM schedules ORDER BY name"


@dataclass(frozen=True, slots=True)
class Schedule:
    """A workflow of ``pipeline`` on ``input``, submitted for ``tenant`` at each cron tick.

    ``cron`` is a standard five-field expression (minute hour day-of-month month
    day-of-week, read as Debian cron does) evaluated by ``cronsim`` in ``timezone``
    (an IANA name; UTC by default). Ticks are compared, stored and keyed in UTC.
    ``catch_up``: after downtime, submit only the latest missed tick ("latest") or
    each missed tick, at most ``MAX_CATCH_UP`` of the latest ("all").

    Construction checks the name, expression, time zone and ``catch_up``
    (``ConfigurationError``, one line); the pipeline and input are checked by the
    tick engine, once the app is complete.
    """

    name: str
    cron: str
    pipeline: str
    input: BaseModel | Mapping[str, Any]
    tenant: str = "default"
    catch_up: CatchUp = "latest"
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        where = f"schedule {self.name!r}"
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigurationError(f"{where} needs a name of letters, digits, - or _")
        if self.catch_up not in ("latest", "all"):
            raise ConfigurationError(
                f"{where}: catch_up must be 'latest' or 'all', not {self.catch_up!r}"
            )
        zone = self.zone()  # raises on an unknown zone
        if len(self.cron.split()) != CRON_FIELDS:
            raise ConfigurationError(
                f"{where}: bad cron expression {self.cron!r} "
                "(needs 5 fields: minute hour day-of-month month day-of-week)"
            )
        try:
            CronSim(self.cron, datetime.now(zone))
        except CronSimError as exc:
            raise ConfigurationError(f"{where}: bad cron expression {self.cron!r} ({exc})") from exc

    def zone(self) -> tzinfo:
        """The time zone the expression is read in."""
        if self.timezone == "UTC":
            return UTC
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ConfigurationError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r}"
            ) from exc

    def key(self, tick: datetime) -> str:
        """The idempotency key of the workflow submitted for ``tick``."""
        return f"schedule:{self.name}:{tick.astimezone(UTC).isoformat()}"

    def ticks_back(self, now: datetime) -> Iterator[datetime]:
        """The ticks at or before ``now``, latest first, in UTC (ends 50 years back)."""
        local = now.astimezone(self.zone())
        # cronsim walking back from a time with microseconds starts at that time itself
        # (truncated): so 1 µs more makes "at or before now" for a whole second too.
        start = local if local.microsecond else local + timedelta(microseconds=1)
        for found in CronSim(self.cron, start, reverse=True):
            yield found.astimezone(UTC)

    def latest(self, now: datetime) -> datetime | None:
        """The latest tick at or before ``now`` (None: none in the last 50 years)."""
        return next(self.ticks_back(now), None)

    def due(self, last_tick: datetime, now: datetime) -> list[datetime]:
        """The ticks after ``last_tick`` and at or before ``now`` to submit, oldest first:
        the latest one only, or (``catch_up="all"``) up to ``MAX_CATCH_UP`` latest ones."""
        wanted = 1 if self.catch_up == "latest" else MAX_CATCH_UP
        found: list[datetime] = []
        for tick in self.ticks_back(now):
            if tick <= last_tick or len(found) == wanted:
                break
            found.append(tick)
        return found[::-1]


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """What Postgres holds for one schedule."""

    name: str
    cron: str
    last_tick: datetime | None
    updated_at: datetime


async def sight(conn: Conn, name: str, cron: str, first_tick: datetime) -> datetime | None:
    """The last tick ``name`` has handled; on first sight, record ``first_tick`` as handled.

    A stored expression that differs from ``cron`` is updated; its last tick is kept.
    None only for a row whose ``last_tick`` is NULL (never written by this module).
    """
    row = await conn.fetchrow(SELECT_SCHEDULE, name)
    if row is None:
        inserted: datetime | None = await conn.fetchval(INSERT_SCHEDULE, name, cron, first_tick)
        return inserted
    if row["cron"] != cron:
        await conn.execute(UPDATE_CRON, name, cron)
    last: datetime | None = row["last_tick"]
    return last


async def advance(conn: Conn, name: str, tick: datetime) -> bool:
    """Record ``tick`` as handled if it is later than the stored one; True if it moved."""
    status: str = await conn.execute(ADVANCE, name, tick)
    return status == "UPDATE 1"


async def list_schedules(conn: Conn) -> list[ScheduleRow]:
    """Every schedule Postgres knows of, by name."""
    return [
        ScheduleRow(r["name"], r["cron"], r["last_tick"], r["updated_at"])
        for r in await conn.fetch(LIST_SCHEDULES)
    ]
