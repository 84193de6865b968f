"""Statements run on the psycopg connection itself, prepared, with SQLAlchemy's errors.

The few statements every step runs are built once (SQLAlchemy constructs compiled once, or
plain SQL) and executed on the driver connection of the write's own SQLAlchemy connection,
so they join its transaction: building, hashing and binding them through SQLAlchemy on every
call costs more than the round trips they save. Errors come back as SQLAlchemy's, so the
store's retry (deadlocks, a dropped connection) and the pool's invalidation work as usual.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

_PARAM = re.compile(r"%\((\w+)\)s")


@functools.cache
def compiled(build: Callable[[], Any]) -> tuple[str, dict[str, Any]]:
    """The SQL of a statement built once, and the values of the literals it carries."""
    dialect = pg_psycopg.dialect()  # type: ignore[no-untyped-call]
    done = build().compile(dialect=dialect)
    return str(done), dict(done.params)


def run_compiled(conn: sa.Connection, build: Callable[[], Any], params: dict[str, Any]) -> Any:
    """Execute the statement ``build`` makes (once) with ``params``; the psycopg cursor."""
    if not isinstance(conn.connection.driver_connection, psycopg.Connection):
        return conn.execute(build(), {k: _plain(v) for k, v in params.items()})
    sql, defaults = compiled(build)
    return execute(conn, sql, {**defaults, **params})


def execute(conn: sa.Connection, sql: str, params: dict[str, Any]) -> Any:
    """Execute plain SQL, prepared, in ``conn``'s transaction; the psycopg cursor.

    A caller's own transaction (``enqueue(session=...)``) may run on another driver: there
    the statement goes through SQLAlchemy, which speaks that driver's parameters."""
    raw = conn.connection.driver_connection
    if not isinstance(raw, psycopg.Connection):
        return _on_other_driver(conn, sql, params)
    try:
        return raw.execute(sql, params, prepare=True)
    except psycopg.Error as exc:
        dbapi = conn.connection.dbapi_connection
        gone = conn.dialect.is_disconnect(exc, dbapi, None)  # type: ignore[arg-type]
        if gone:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql, params, exc, psycopg.Error, connection_invalidated=gone, dialect=conn.dialect
        ) from exc


def _on_other_driver(conn: sa.Connection, sql: str, params: dict[str, Any]) -> Any:
    """``sql`` (psycopg's ``%(name)s`` style) on a connection of another driver."""
    text = _PARAM.sub(r"(:\1)", sql).replace("%%", "%")  # "(:x)::jsonb": not ":x::"
    values = {k: (v.dumps or json.dumps)(v.obj) if isinstance(v, Jsonb) else v
              for k, v in params.items()}
    return conn.execute(sa.text(text), values)


def _plain(value: Any) -> Any:
    """A psycopg JSON wrapper's value, for a SQLAlchemy JSON parameter."""
    return value.obj if isinstance(value, Jsonb) else value
