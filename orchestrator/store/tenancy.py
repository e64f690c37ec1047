"""The tenant of a transaction: what row-level security lets it see.

Tenant tables (sessions, workflows, messages, memories) carry policies on
``orchestrator.tenant`` (see migration V8). ``scoped`` opens a transaction
with the tenant set for it alone (``set_config(..., true)``), so a pooled
connection never carries one tenant's scope into the next transaction.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from orchestrator.store import Conn

SET_TENANT = "SELECT set_config('orchestrator.tenant', $1, true)"


@contextlib.asynccontextmanager
async def scoped(conn: Conn, tenant_id: str) -> AsyncIterator[Conn]:
    """A transaction on ``conn`` that sees ``tenant_id``'s rows of the tenant tables."""
    async with conn.transaction():
        await conn.execute(SET_TENANT, tenant_id)
        yield conn
