"""Postgres stores: migrations plus one module per aggregate, SQL as named constants."""

from typing import TYPE_CHECKING, Any, TypeAlias

from asyncpg import Connection
from asyncpg.pool import PoolConnectionProxy

# A plain connection or one borrowed from a pool: stores accept either.
if TYPE_CHECKING:
    Conn: TypeAlias = Connection[Any] | PoolConnectionProxy[Any]
else:
    Conn: TypeAlias = Connection | PoolConnectionProxy

__all__ = ["Conn"]
