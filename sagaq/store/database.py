"""Engines, connection checks and migrations (Alembic, shipped inside the package)."""

from __future__ import annotations

import select
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from sagaq.errors import ConfigurationError, DatabaseUnavailable
from sagaq.settings import normalize_database_url

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "sagaq_alembic_version"  # not alembic_version: the app may have its own


def safe_url(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return make_url(normalize_database_url(url)).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable database URL>"


def create_engine(url: str, *, pool_size: int = 2, max_overflow: int = 2) -> sa.Engine:
    url = normalize_database_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ConfigurationError(
            f"sagaq stores sagas in PostgreSQL only, not {parsed.get_backend_name()}: set "
            "SAGAQ_DATABASE_URL=postgresql://..., or leave it unset for the embedded "
            "PostgreSQL (pip install 'sagaq[embedded]')")
    return _drop_dead_on_checkout(sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        # No pool_pre_ping: a ping is one more round trip per checkout. A socket check
        # (below) finds connections the server dropped, without a round trip.
        connect_args={"connect_timeout": 5},
    ))


def autocommit_engine(engine: sa.Engine, *, read_only: bool = False) -> sa.Engine:
    """A second engine on the same database whose connections stay in autocommit
    (``read_only``: and refuse to write)."""
    pool = engine.pool
    size, overflow = (pool.size(), pool._max_overflow) if isinstance(pool, sa.QueuePool) else (2, 2)
    args: dict[str, Any] = {"connect_timeout": 5}
    if read_only:
        args["options"] = "-c default_transaction_read_only=on"
    return _drop_dead_on_checkout(sa.create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        pool_size=size,
        max_overflow=overflow,
        connect_args=args,
    ))


def _drop_dead_on_checkout(engine: sa.Engine) -> sa.Engine:
    """Hand out no pooled connection the server has closed (a restart, a failover,
    pg_terminate_backend): the first statement on it would fail, after a restart once per
    pooled connection. An idle connection's socket has nothing to read unless the server
    said goodbye (or closed it), so a zero-timeout poll finds it without a round trip."""

    @sa.event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        if _is_dead(dbapi_conn):
            raise sa.exc.DisconnectionError("the server closed this pooled connection")

    return engine


def _is_dead(dbapi_conn: Any) -> bool:
    if getattr(dbapi_conn, "closed", False) or getattr(dbapi_conn, "broken", False):
        return True
    try:
        fd = dbapi_conn.pgconn.socket
        readable, _, _ = select.select([fd], [], [], 0)
    except Exception:  # no socket to look at (closed already): let the pool replace it
        return True
    return bool(readable)


def check(engine: sa.Engine) -> None:
    """Raise :class:`DatabaseUnavailable` (one line, password hidden) if nothing answers."""
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.DBAPIError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
        raise DatabaseUnavailable(
            f"cannot reach the database at {safe_url(str(engine.url))}: {reason}"
        ) from None


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    # ConfigParser interpolates "%"; URLs with escaped characters need it doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_database_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (``sagaq db upgrade``)."""
    from alembic import command

    check(create_engine(url))
    command.upgrade(alembic_config(url), revision)


def current_revision(engine: sa.Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        rev: str | None = context.get_current_revision()
        return rev
