"""Working memory of a session in Redis: ONE small versioned JSON value, with a TTL.

The values themselves (``WorkingMemory``, ``Patch``, their JSON and cutting) are in
``orchestrator.schemas.memory``, which the step API imports; this module only reads
and writes them. The step reaches it through ``WorkingMemoryCache`` (the runtime's
``working_memory``), never by importing it.

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

from typing import Any

import redis.asyncio as aioredis

from orchestrator.coordination.keys import Keys
from orchestrator.schemas.memory import (
    KEY_OVERHEAD_BYTES,
    MAX_APPLIED,
    MAX_RECALLED,
    MAX_TOOLS,
    Patch,
    WorkingMemory,
)

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


class WorkingMemoryCache:
    """The working memories of the runtime's Redis, with the settings' TTL and byte cap:
    ``load``, ``store`` and ``append_in`` bound to a client and key namespace."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, ttl_seconds: int, max_bytes: int
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_seconds
        self._max_bytes = max_bytes

    async def load(self, tenant: str, session: str) -> WorkingMemory | None:
        """The session's working memory; None when there is none; ``CorruptWorkingMemory``."""
        return await load(self._client, self._keys, tenant, session)

    async def store(self, tenant: str, session: str, value: WorkingMemory) -> WorkingMemory:
        """Write ``value`` (cut to the cap) with the TTL; returns what was written."""
        return await store(
            self._client,
            self._keys,
            tenant,
            session,
            value,
            ttl_seconds=self._ttl,
            max_bytes=self._max_bytes,
        )

    def append_in(self, pipe: Any, tenant: str, session: str, patch: Patch) -> None:
        """Queue ``patch`` on a pipeline; see ``APPEND``."""
        append_in(
            pipe,
            self._keys,
            tenant,
            session,
            patch,
            ttl_seconds=self._ttl,
            max_bytes=self._max_bytes,
        )

    def drop_in(self, pipe: Any, tenant: str, session: str) -> None:
        """Queue deleting the session's working memory on a pipeline (the next reader
        rebuilds it from Postgres)."""
        pipe.delete(self._keys.working_memory(tenant, session))
