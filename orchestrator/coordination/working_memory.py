"""Working memory of a session in Redis: ONE small versioned JSON value, with a TTL.

Speed only. Postgres holds the transcript, the tool runs and the goal; a value
that is missing (expired, flushed), corrupt or stale is rebuilt from there by
its reader (``orchestrator.step.memory``) and written back with ``store``.

Writers never create it: a completing step appends its lines and tool outputs
with ``APPEND`` in the handoff's pipeline (one more command in that round trip),
only to a value that exists. A missing value stays missing, and the next reader
hydrates it from Postgres, which already holds the step's commit. A value stays
under ``max_bytes``: oldest messages go first, then oldest tool outputs, then
oldest recalled memories.

The value (``VERSION`` 1)::

    {"v": 1, "wf": workflow id, "seq": last step seq written, "goal": str | null,
     "messages": [{"role", "author", "content", "id"}],
     "tools": [{"tool", "result"}], "recalled": [{"id", "kind", "content", "score"}],
     "applied": [step ids whose append it holds (the latest few)]}

``applied`` makes an append exactly-once: a step's late append to a value that
a reader hydrated after the step's commit is recognized and ignored. (A step seq
alone cannot order it: parallel branches end in any order.) ``wf`` ties the value
to the ticket it was built for: the next ticket of the session (whose customer
message only Postgres has) rebuilds it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis

from orchestrator.coordination.keys import Keys

VERSION = 1
MAX_TOOLS = 8  # the latest tool outputs kept (the byte cap alone would keep them all)
MAX_RECALLED = 10
MAX_APPLIED = 16
TOOL_RESULT_CHARS = 1_000  # a tool output is cut to this many characters
# What Redis spends on the key besides the value (the key, object and dict entry, as
# MEMORY USAGE counts them): the value gets the cap less this, so the key stays under it.
KEY_OVERHEAD_BYTES = 256

# KEYS[1]  the working-memory key of one session
# ARGV[1]  the step's patch, JSON: {"v", "wf", "step", "seq", "messages", "tools",
#          "recalled", "goal" (absent: unchanged)}
# ARGV[2]  max bytes of the value  ARGV[3] TTL seconds
# ARGV[4]  max tools kept           ARGV[5] max recalled kept   ARGV[6] step ids kept
# returns  0: no value (left missing)  1: appended  2: this step's append is there
#          already  3: the value was corrupt, of another version or ticket (deleted,
#          so the next reader rebuilds it from Postgres)
APPEND = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local patch = cjson.decode(ARGV[1])
local ok, wm = pcall(cjson.decode, raw)
if not ok or type(wm) ~= 'table' or wm.v ~= patch.v or wm.wf ~= patch.wf then
  redis.call('DEL', KEYS[1])
  return 3
end
local function list(t) if type(t) == 'table' then return t end return {} end
local applied = list(wm.applied)
for _, id in ipairs(applied) do
  if id == patch.step then return 2 end
end
local function extend(name, limit)
  local items = list(wm[name])
  for _, item in ipairs(list(patch[name])) do items[#items + 1] = item end
  local kept = {}
  for i = math.max(1, #items - limit + 1), #items do kept[#kept + 1] = items[i] end
  wm[name] = kept
end
extend('messages', 1000000)
extend('tools', tonumber(ARGV[4]))
extend('recalled', tonumber(ARGV[5]))
if patch.goal ~= nil then wm.goal = patch.goal end
if type(wm.seq) ~= 'number' or patch.seq > wm.seq then wm.seq = patch.seq end
applied[#applied + 1] = patch.step
local ids = {}
for i = math.max(1, #applied - tonumber(ARGV[6]) + 1), #applied do ids[#ids + 1] = applied[i] end
wm.applied = ids
local body = cjson.encode(wm)
local over = #body - tonumber(ARGV[2])
for _, name in ipairs({'messages', 'tools', 'recalled'}) do
  if over <= 0 then break end
  local items, drop = wm[name], 0
  while over > 0 and drop < #items do
    drop = drop + 1
    over = over - #cjson.encode(items[drop]) - 1
  end
  local kept = {}
  for i = drop + 1, #items do kept[#kept + 1] = items[i] end
  wm[name] = kept
end
body = cjson.encode(wm)
redis.call('SET', KEYS[1], body, 'EX', tonumber(ARGV[3]))
return 1
"""


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


async def load(
    client: aioredis.Redis, keys: Keys, tenant: str, session: str
) -> WorkingMemory | None:
    """The session's working memory; None when there is none; ``CorruptWorkingMemory``."""
    raw = await client.get(keys.working_memory(tenant, session))
    return None if raw is None else WorkingMemory.from_json(raw)


async def store(
    client: aioredis.Redis,
    keys: Keys,
    tenant: str,
    session: str,
    value: WorkingMemory,
    *,
    ttl_seconds: int,
    max_bytes: int,
) -> WorkingMemory:
    """Write ``value`` with its TTL, cut so that the key costs Redis at most
    ``max_bytes``; returns what was written."""
    value = value.fit(max_bytes - KEY_OVERHEAD_BYTES)
    await client.set(keys.working_memory(tenant, session), value.to_json(), ex=ttl_seconds)
    return value


def append_in(
    pipe: Any,
    keys: Keys,
    tenant: str,
    session: str,
    patch: Patch,
    *,
    ttl_seconds: int,
    max_bytes: int,
) -> None:
    """Queue ``patch`` on a pipeline (the handoff's round trip); see ``APPEND``. The key
    costs Redis at most ``max_bytes``.

    EVAL, not EVALSHA: a Redis restarted empty would answer NOSCRIPT inside the pipeline.
    """
    pipe.eval(
        APPEND,
        1,
        keys.working_memory(tenant, session),
        patch.to_json(),
        max_bytes - KEY_OVERHEAD_BYTES,
        ttl_seconds,
        MAX_TOOLS,
        MAX_RECALLED,
        MAX_APPLIED,
    )


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
