"""compare.py peer: DBOS (its own venv), workflows in this process.

A ``@DBOS.workflow`` calling three ``@DBOS.step`` functions (triage, research,
response); the no-op tool is awaited inside the research step (as in the other
systems it is part of that step, not a checkpoint of its own). Throughput: every
workflow started with ``DBOS.start_workflow_async`` (16 starts in flight), then
every handle's ``get_result``; latency: one start and ``get_result`` at a time.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import common
from dbos import DBOS


@DBOS.step()
async def triage_step(t: dict[str, Any]) -> dict[str, Any]:
    return common.triage(t)


@DBOS.step()
async def research_step(t: dict[str, Any], tri: dict[str, Any]) -> dict[str, Any]:
    found = await common.noop_tool(t["subject"])
    return common.research(t, tri, found)


@DBOS.step()
async def response_step(
    t: dict[str, Any], tri: dict[str, Any], res: dict[str, Any]
) -> dict[str, Any]:
    return common.response(t, tri, res)


@DBOS.workflow()
async def ticket_workflow(t: dict[str, Any]) -> dict[str, Any]:
    tri = await triage_step(t)
    res = await research_step(t, tri)
    return await response_step(t, tri, res)


async def main(args: Any) -> None:
    DBOS(
        config={
            "name": "compare",
            "system_database_url": args.database_url,
            "sys_db_pool_size": args.pool,
            "log_level": "WARNING",
        }
    )
    DBOS.launch()
    limiter = asyncio.Semaphore(args.submitters)

    async def start(i: int) -> Any:
        async with limiter:
            return await DBOS.start_workflow_async(ticket_workflow, common.ticket(i))

    async def batch(n: int, first: int) -> int:
        handles = await asyncio.gather(*(start(i) for i in range(first, first + n)))
        results = await asyncio.gather(*(h.get_result() for h in handles))
        return sum("reply" in r for r in results)

    async def one(i: int) -> None:
        handle = await DBOS.start_workflow_async(ticket_workflow, common.ticket(i))
        result = await handle.get_result()
        assert "reply" in result

    try:
        await common.drive(args, batch, one, [os.getpid()])
    finally:
        DBOS.destroy()


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=20, help="system database pool size")
    p.add_argument("--submitters", type=int, default=16, help="concurrent starts")
    asyncio.run(main(p.parse_args()))
