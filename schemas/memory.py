"""Working memory of a session as plain values: what a step reads and appends.

No Redis here: ``orchestrator.coordination.working_memory`` stores these values
(and documents the stored JSON and its ``APPEND`` script); the step API builds,
reads and cuts them. Both sides use the same JSON form, so a value cut here
(``WorkingMemory.fit``) is cut as the script cuts it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

VERSION = 1
MAX_TOOLS = 8  # the latest tool outputs kept (the byte cap alone would keep them all)
MAX_RECALLED = 10
MAX_APPLIED = 16
TOOL_RESULT_CHARS = 1_000  # a tool output is cut to this many characters
# What Redis spends on the key besides the value (the key, object and dict entry, as
# MEMORY USAGE counts them): the value gets the cap less this, so the key stays under it.
KEY_OVERHEAD_BYTES = 256


class CorruptWorkingMemory(ValueError):
    """The stored value is not a working memory of this version (the reader rebuilds it)."""


@dataclass(frozen=True, slots=True)
class Line:
    """One transcript line: ``role`` (customer, agent, system), who said it, what.
    ``id`` is its row in Postgres when known (lines appended by a step have none)."""

    role: str
    author: str
    content: str
    id: int | None = None


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """A tool's result, as JSON text cut to ``TOOL_RESULT_CHARS``."""

    tool: str
    result: str


@dataclass(frozen=True, slots=True)
class Recalled:
    """A long-term memory recalled into the session, with its recall score."""

    id: int
    kind: str
    content: str
    score: float


@dataclass(frozen=True, slots=True)
class WorkingMemory:
    """The working memory of a session, as of one read (a frozen value)."""

    workflow: str  # the ticket it was built for
    seq: int  # the last step seq written into it (-1: none yet)
    goal: str | None = None
    messages: tuple[Line, ...] = ()
    tools: tuple[ToolOutput, ...] = ()
    recalled: tuple[Recalled, ...] = ()
    applied: tuple[str, ...] = field(default=(), repr=False)

    def to_json(self) -> str:
        """The stored form (compact UTF-8 JSON, as the script writes it)."""
        return _dumps(
            {
                "v": VERSION,
                "wf": self.workflow,
                "seq": self.seq,
                "goal": self.goal,
                "messages": [_line(m) for m in self.messages],
                "tools": [{"tool": t.tool, "result": t.result} for t in self.tools],
                "recalled": [_recalled(r) for r in self.recalled],
                "applied": list(self.applied),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> WorkingMemory:
        """Parse a stored value; ``CorruptWorkingMemory`` when it is not one."""
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("v") != VERSION:
                raise CorruptWorkingMemory(f"not a version {VERSION} working memory")
            goal = data.get("goal")
            return cls(
                workflow=str(data["wf"]),
                seq=int(data.get("seq", -1)),
                goal=None if goal is None else str(goal),
                messages=tuple(
                    Line(str(m["role"]), str(m["author"]), str(m["content"]), _id(m.get("id")))
                    for m in _items(data.get("messages"))
                ),
                tools=tuple(
                    ToolOutput(str(t["tool"]), str(t["result"])) for t in _items(data.get("tools"))
                ),
                recalled=tuple(
                    Recalled(int(r["id"]), str(r["kind"]), str(r["content"]), float(r["score"]))
                    for r in _items(data.get("recalled"))
                ),
                applied=tuple(str(s) for s in _items(data.get("applied"))),
            )
        except CorruptWorkingMemory:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CorruptWorkingMemory(f"unreadable working memory: {exc}") from exc

    def fit(self, max_bytes: int) -> WorkingMemory:
        """This value cut to ``max_bytes`` as the script cuts it: oldest messages first,
        then oldest tool outputs, then oldest recalled memories."""
        value = self
        over = len(value.to_json().encode()) - max_bytes
        for name in ("messages", "tools", "recalled"):
            if over <= 0:
                break
            items: tuple[Any, ...] = getattr(value, name)
            drop = 0
            while over > 0 and drop < len(items):
                over -= len(_dumps(_item(items[drop])).encode()) + 1
                drop += 1
            cut: dict[str, Any] = {name: items[drop:]}
            value = replace(value, **cut)
        return value


@dataclass(frozen=True, slots=True)
class Patch:
    """What one completing step adds to its session's working memory."""

    workflow: str
    step: str
    seq: int
    messages: Sequence[Line] = ()
    tools: Sequence[ToolOutput] = ()
    recalled: Sequence[Recalled] = ()
    goal: str | None = None
    set_goal: bool = False  # False: the goal stays as it is

    def __bool__(self) -> bool:
        return bool(self.messages or self.tools or self.recalled or self.set_goal)

    def to_json(self) -> str:
        """The script's ARGV[1]."""
        data: dict[str, Any] = {
            "v": VERSION,
            "wf": self.workflow,
            "step": self.step,
            "seq": self.seq,
            "messages": [_line(m) for m in self.messages],
            "tools": [{"tool": t.tool, "result": t.result} for t in self.tools],
            "recalled": [_recalled(r) for r in self.recalled],
        }
        if self.set_goal:
            data["goal"] = self.goal
        return _dumps(data)


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, marked when cut."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def tool_output(tool: str, result: Any) -> ToolOutput:
    """A tool result as working memory keeps it: JSON text, cut."""
    text = result if isinstance(result, str) else _dumps(result)
    return ToolOutput(tool, truncate(text, TOOL_RESULT_CHARS))


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _items(value: Any) -> list[Any]:
    # Lua's cjson writes an empty list as {}: read it as [].
    if value is None or value == {}:
        return []
    if not isinstance(value, list):
        raise CorruptWorkingMemory(f"expected a list, got {type(value).__name__}")
    return value


def _id(value: Any) -> int | None:
    return None if value is None else int(value)


def _line(m: Line) -> dict[str, Any]:
    return {"role": m.role, "author": m.author, "content": m.content, "id": m.id}


def _recalled(r: Recalled) -> dict[str, Any]:
    return {"id": r.id, "kind": r.kind, "content": r.content, "score": r.score}


def _item(item: Line | ToolOutput | Recalled) -> dict[str, Any]:
    if isinstance(item, Line):
        return _line(item)
    if isinstance(item, Recalled):
        return _recalled(item)
    return {"tool": item.tool, "result": item.result}
