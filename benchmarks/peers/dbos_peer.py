"""compare.py peer: DBOS (its own venv), workflows in this process.

A ``@DBOS.workflow`` calling three ``@DBOS.step`` functions (triage, research,
response); the no-op tool is awaited inside the research step (as in the other
systems it is part of that step, not a checkpoint of its own). Throughput: every
workflow started with ``DBOS.start_workflow_async`` (16 starts in flight; all
workflows run at once unless ``--in-flight`` bounds them), each handle's
``get_result`` awaited; latency: one start and ``get_result`` at a time.
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
    in_flight = asyncio.Semaphore(args.in_flight or args.workflows + args.warmup)
    starting = asyncio.Semaphore(args.submitters)

    async def run(i: int) -> bool:
        async with in_flight:
            async with starting:
                handle = await DBOS.start_workflow_async(ticket_workflow, common.ticket(i))
            return "reply" in await handle.get_result()

    async def batch(n: int, first: int) -> int:
        return sum(await asyncio.gather(*(run(i) for i in range(first, first + n))))

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
    # 0: every workflow started at once (each durable once started, as a submission to the
    # other systems is); 64 made no difference on 2 cores (64 vs 70 wf/s, equally noisy).
    p.add_argument("--in-flight", type=int, default=0, help="workflows at once (0: all)")
    asyncio.run(main(p.parse_args()))
