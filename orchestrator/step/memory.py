"""``ctx.memory``: the session's working memory, its transcript, and recall.

Working memory lives in Redis (the runtime's ``working_memory``, see
``StepServices``; its values are ``orchestrator.schemas.memory``), for speed only.
The first read of a step loads it; when it is missing (expired, flushed),
corrupt, or stale (built for an earlier ticket of the session, or before the
customer's reply this step took), it is rebuilt from Postgres: the customer's
recent transcript across their sessions, the workflow's latest tool outputs and
its goal, then written back. A Redis outage rebuilds it without writing back:
working memory never fails a step.

What the step did with memory is committed with the step, as events: one
``memory.hydrated`` (why, and what was loaded, as counts), one ``memory.recalled``
per recall (query, mode, cache hit, what was found and its scores), and
``memory.goal`` when the step set the goal (hydration reads it back). The
step's own additions (its ``ctx.say`` lines and tool outputs, the goal, recalled
memories) reach Redis in the handoff's round trip (``append_in``), after the
commit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from orchestrator.connections import REDIS_DOWN
from orchestrator.schemas import EventType
from orchestrator.schemas import memory as wm
from orchestrator.schemas.memory import Line, Recalled, WorkingMemory
from orchestrator.step.info import StepInfo
from orchestrator.step.recall import recall_for_step
from orchestrator.step.services import StepServices
from orchestrator.store.memory import Memory
from orchestrator.store.tool_runs import ToolRun

log = logging.getLogger("orchestrator.memory")

HYDRATED = EventType.MEMORY_HYDRATED
RECALLED = EventType.MEMORY_RECALLED
GOAL = EventType.MEMORY_GOAL
HYDRATE_MESSAGES = 50  # transcript lines a rebuild loads (then cut to the byte cap)
HYDRATE_TOOLS = 5
MESSAGE_CHARS = 4_000  # one line's share of working memory, at most
GOAL_CHARS = 500
RECALLED_CHARS = 1_000


class SessionMemory:
    """What a step remembers of its session and customer (see the module docstring)."""

    def __init__(self, services: StepServices, info: StepInfo) -> None:
        self._services = services
        self.info = info
        # Set by the engine when this execution took a customer's reply: working memory
        # in Redis does not hold it (only Postgres does), so it is rebuilt.
        self.stale = False
        self._value: WorkingMemory | None = None
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._goal: str | None = None
        self._goal_set = False
        self._recalled: list[Recalled] = []

    async def working(self) -> WorkingMemory:
        """The session's working memory (read once per step, rebuilt from Postgres when
        needed), with this step's goal and recalled memories."""
        if self._value is None:
            self._value = await self._read()
        return self._with_mine(self._value)

    async def transcript(self, limit: int = 20) -> list[Line]:
        """The customer's latest ``limit`` transcript lines, oldest first, across their
        sessions: as working memory holds them (the recent ones, within its byte cap)."""
        messages = (await self.working()).messages
        return list(messages[-limit:]) if limit > 0 else []

    def set_goal(self, goal: str | None) -> None:
        """Set the session's current goal (kept with the step, written to working memory
        after the commit)."""
        self._goal = None if goal is None else wm.truncate(goal, GOAL_CHARS)
        self._goal_set = True

    async def recall(
        self, query: str, *, k: int = 5, kinds: Sequence[str] | None = None
    ) -> list[Memory]:
        """The top ``k`` long-term memories of this tenant and customer for ``query``
        (each with its score and source); recorded on the step and added to working
        memory's ``recalled``."""
        result = await recall_for_step(self._services, self.info, query, k=k, kinds=kinds)
        for m in result.memories:
            self._recalled.append(
                Recalled(m.id, m.kind, wm.truncate(m.content, RECALLED_CHARS), m.score)
            )
        self._events.append((RECALLED, result.record()))
        return list(result.memories)

    def record(self) -> list[tuple[str, dict[str, Any]]]:
        """The step's memory events, to commit with the step."""
        events = list(self._events)
        if self._goal_set:
            events.append((GOAL, {"goal": self._goal}))
        return events

    def append_in(
        self, pipe: Any, *, said: Sequence[str] = (), runs: Sequence[ToolRun] = ()
    ) -> None:
        """Add this step's working-memory update to the handoff's Redis pipeline: its
        lines ``said``, the results of its tool ``runs``, the goal and recalled memories.
        One command; nothing when the step added nothing."""
        info, rt = self.info, self._services
        if not info.session_id:
            return
        if self.stale and self._value is None:
            # Redis lacks the customer's reply and this step did not rebuild: the next
            # reader must, from Postgres (which holds this step's commit too).
            rt.working_memory.drop_in(pipe, info.tenant_id, info.session_id)
            return
        patch = wm.Patch(
            workflow=str(info.workflow_id),
            step=str(info.step_id),
            seq=info.seq,
            messages=[Line("agent", info.agent, wm.truncate(s, MESSAGE_CHARS)) for s in said],
            tools=[wm.tool_output(r.tool, r.result) for r in runs if r.status == "succeeded"],
            recalled=self._recalled,
            goal=self._goal,
            set_goal=self._goal_set,
        )
        if patch:
            rt.working_memory.append_in(pipe, info.tenant_id, info.session_id, patch)

    def _with_mine(self, value: WorkingMemory) -> WorkingMemory:
        mine = {r.id for r in self._recalled}
        recalled = (*(r for r in value.recalled if r.id not in mine), *self._recalled)
        goal = self._goal if self._goal_set else value.goal
        return replace(value, goal=goal, recalled=recalled)

    async def _read(self) -> WorkingMemory:
        rt, info = self._services, self.info
        write_back = True
        try:
            value = await rt.working_memory.load(info.tenant_id, info.session_id)
        except wm.CorruptWorkingMemory as exc:
            log.warning("session %s: corrupt working memory (%s); rebuilding", info.session_id, exc)
            reason = "corrupt"
        except REDIS_DOWN as exc:
            # Working memory is speed only: rebuild it, leave Redis alone.
            log.warning("working memory unreadable (%s); rebuilding from Postgres", exc)
            reason, write_back = "redis unavailable", False
        else:
            if value is None:
                reason = "missing"
            elif value.workflow != str(info.workflow_id) or self.stale:
                reason = "stale"
            else:
                return value
        value = await self._hydrate(reason)
        if write_back:
            try:
                value = await rt.working_memory.store(info.tenant_id, info.session_id, value)
            except REDIS_DOWN as exc:
                log.warning("working memory not written back (%s)", exc)
        return value

    async def _hydrate(self, reason: str) -> WorkingMemory:
        """Working memory rebuilt from Postgres; the step records that it did."""
        info = self.info
        store = self._services.store.transcripts
        lines, results, facts = await store.hydration(
            tenant_id=info.tenant_id,
            session_id=info.session_id,
            customer_id=info.customer_id,
            workflow_id=info.workflow_id,
            messages=HYDRATE_MESSAGES,
            tools=HYDRATE_TOOLS,
            goal_event=GOAL,
            applied=wm.MAX_APPLIED,
        )
        value = WorkingMemory(
            workflow=str(info.workflow_id),
            seq=facts.seq,
            goal=facts.goal,
            messages=tuple(
                Line(m.role, m.author, wm.truncate(m.content, MESSAGE_CHARS), m.id) for m in lines
            ),
            tools=tuple(wm.tool_output(r.tool, r.result) for r in results),
            applied=facts.applied,
        ).fit(self._services.settings.working_memory_max_bytes - wm.KEY_OVERHEAD_BYTES)
        self._events.append(
            (
                HYDRATED,
                {
                    "reason": reason,
                    "messages": len(value.messages),
                    "sessions": len({m.session_id for m in lines}),
                    "tools": len(value.tools),
                    "goal": value.goal is not None,
                },
            )
        )
        return value
