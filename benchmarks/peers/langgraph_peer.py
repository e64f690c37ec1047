"""compare.py peer: LangGraph with its Postgres checkpointer (its own venv), in this process.

A StateGraph of three nodes (triage -> research -> response) compiled with an
AsyncPostgresSaver on a psycopg pool; one thread_id per workflow; the no-op tool is
awaited inside the research node. Durability is LangGraph's default (``async``:
a step's checkpoint is written while the next step runs; ``ainvoke`` returns once
all are written) unless ``--durability`` says otherwise. Throughput: ``ainvoke`` of
every workflow with ``asyncio.gather``, at most ``--in-flight`` (64) at once.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, TypedDict

import common
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.graph import END, START, StateGraph
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool


class State(TypedDict, total=False):
    ticket: dict[str, Any]
    triage: dict[str, Any]
    research: dict[str, Any]
    response: dict[str, Any]


async def triage_node(state: State) -> State:
    return {"triage": common.triage(state["ticket"])}


async def research_node(state: State) -> State:
    t = state["ticket"]
    found = await common.noop_tool(t["subject"])
    return {"research": common.research(t, state["triage"], found)}


async def response_node(state: State) -> State:
    return {"response": common.response(state["ticket"], state["triage"], state["research"])}


def graph_builder() -> StateGraph[State]:
    builder = StateGraph(State)
    builder.add_node("triage", triage_node)
    builder.add_node("research", research_node)
    builder.add_node("response", response_node)
    builder.add_edge(START, "triage")
    builder.add_edge("triage", "research")
    builder.add_edge("research", "response")
    builder.add_edge("response", END)
    return builder


async def main(args: Any) -> None:
    # The connection settings AsyncPostgresSaver.from_conn_string uses, on a pool.
    kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
    pool = AsyncConnectionPool(args.database_url, max_size=args.pool, kwargs=kwargs, open=False)
    await pool.open()
    try:
        saver = AsyncPostgresSaver(pool)  # type: ignore[arg-type]
        await saver.setup()
        graph = graph_builder().compile(checkpointer=saver)
        limiter = asyncio.Semaphore(args.in_flight)

        async def invoke(i: int) -> bool:
            config: Any = {"configurable": {"thread_id": f"ticket-{i}"}}
            out = await graph.ainvoke(
                {"ticket": common.ticket(i)}, config, durability=args.durability
            )
            return "reply" in out["response"]

        async def bounded(i: int) -> bool:
            async with limiter:
                return await invoke(i)

        async def batch(n: int, first: int) -> int:
            return sum(await asyncio.gather(*(bounded(i) for i in range(first, first + n))))

        async def one(i: int) -> None:
            assert await invoke(i)

        await common.drive(args, batch, one, [os.getpid()])
    finally:
        await pool.close()


if __name__ == "__main__":
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--pool", type=int, default=20, help="psycopg pool size")
    p.add_argument("--in-flight", type=int, default=64, help="ainvoke calls at once")
    p.add_argument("--durability", choices=["sync", "async", "exit"], default="async")
    asyncio.run(main(p.parse_args()))
