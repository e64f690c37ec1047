"""compare.py peer: a hand-written loop on redis-py + asyncpg (the runtime's venv).

Three stages (triage, research, response), each a Redis stream with a consumer
group read by ``--concurrency`` tasks. Per step, each awaited in turn: XREADGROUP
COUNT 1, the stub agent (research also awaits the no-op tool), HSET of the
workflow state, one INSERT into a steps table (its own commit), XADD to the next
stream (the last stage to a ``done`` stream), XACK. A submit is one XADD (nothing
in Postgres). None of a runtime's guarantees: no fencing, no retries, no recovery
of pending entries.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from typing import Any

import asyncpg
import common
import redis.asyncio as aioredis

STAGES = ("triage", "research", "response")
DDL = """
CREATE TABLE IF NOT EXISTS steps (
    workflow_id bigint NOT NULL,
    step text NOT NULL,
    output jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, step)
)
"""
INSERT = "INSERT INTO steps (workflow_id, step, output) VALUES ($1, $2, $3::jsonb)"


async def agent(stage: str, state: dict[str, Any]) -> dict[str, Any]:
    t = state["ticket"]
    if stage == "triage":
        return common.triage(t)
    if stage == "research":
        found = await common.noop_tool(t["subject"])
        return common.research(t, state["triage"], found)
    return common.response(t, state["triage"], state["research"])


async def consume(
    r: aioredis.Redis, pool: asyncpg.Pool, prefix: str, i: int, name: str, stop: asyncio.Event
) -> None:
    stream = f"{prefix}:{STAGES[i]}"
    nxt = f"{prefix}:{STAGES[i + 1]}" if i + 1 < len(STAGES) else f"{prefix}:done"
    while not stop.is_set():
        reply: Any = await r.xreadgroup("g", name, {stream: ">"}, count=1, block=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                wid, state = int(fields[b"w"]), json.loads(fields[b"s"])
                output = await agent(STAGES[i], state)
                state[STAGES[i]] = output
                encoded = json.dumps(state)
                await r.hset(f"{prefix}:wf:{wid}", mapping={"state": encoded, "step": STAGES[i]})
                await pool.execute(INSERT, wid, STAGES[i], json.dumps(output))
                await r.xadd(nxt, {"w": str(wid), "s": encoded})
                await r.xack(stream, "g", entry_id)


class Client:
    """Submits onto the first stream; learns of finished workflows from the done stream."""

    def __init__(self, r: aioredis.Redis, prefix: str, submitters: int) -> None:
        self.r, self.prefix = r, prefix
        self.done = f"{prefix}:done"
        self.limiter = asyncio.Semaphore(submitters)
        self.last: Any = None  # the newest done entry seen by one()

    async def submit(self, i: int) -> None:
        async with self.limiter:
            state = json.dumps({"ticket": common.ticket(i)})
            await self.r.xadd(f"{self.prefix}:triage", {"w": str(i), "s": state})

    async def batch(self, n: int, first: int) -> int:
        base = await self.r.xlen(self.done)
        await asyncio.gather(*(self.submit(i) for i in range(first, first + n)))
        while (finished := await self.r.xlen(self.done) - base) < n:
            await asyncio.sleep(0.01)
        return int(finished)

    async def one(self, i: int) -> None:
        if self.last is None:
            newest = await self.r.xrevrange(self.done, count=1)
            self.last = newest[0][0] if newest else "0-0"
        await self.submit(i)
        while True:
            reply: Any = await self.r.xread({self.done: self.last}, count=100, block=1000)
            for _, entries in reply:
                for entry_id, fields in entries:
                    self.last = entry_id
                    if int(fields[b"w"]) == i:
                        return


async def main(args: Any) -> None:
    prefix = f"loop-{secrets.token_hex(3)}"
    r = aioredis.Redis.from_url(args.redis_url, max_connections=3 * args.concurrency + 32)
    pool = await asyncpg.create_pool(args.database_url, min_size=4, max_size=args.pool)
    await pool.execute(DDL)
    for s in STAGES:
        await r.xgroup_create(f"{prefix}:{s}", "g", id="0", mkstream=True)
    stop = asyncio.Event()
    consumers = [
        asyncio.create_task(consume(r, pool, prefix, i, f"c{c}", stop))
        for i in range(len(STAGES))
        for c in range(args.concurrency)
    ]
    client = Client(r, prefix, args.submitters)
    try:
        await common.drive(args, client.batch, client.one, [os.getpid()])
    finally:
        # Each consumer sees the flag within one XREADGROUP block (100 ms): cancelling them
        # mid-command left redis-py's pool hanging on close now and then.
        stop.set()
        await asyncio.gather(*consumers, return_exceptions=True)
        await pool.close()
        await r.aclose()


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=20, help="Postgres pool size")
    p.add_argument("--submitters", type=int, default=16, help="concurrent submits")
    asyncio.run(main(p.parse_args()))
