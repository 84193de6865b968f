"""Checks at the front door: before a worker or beat starts, and around app-facing calls.

Each failure is one line that names what to do (a variable, `sagaq db upgrade`, `sagaq
keygen`), never a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from sagaq.errors import ConfigurationError, DatabaseUnavailable, InputError

if TYPE_CHECKING:
    from sagaq.runtime import Runtime

URL_FORM = "postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
_UNDEFINED_TABLE = "42P01"


def check_database_url(url: str) -> None:
    """A URL sqlalchemy can parse, for a backend sagaq runs on; never echoes a password."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        raise ConfigurationError(
            f"SAGAQ_DATABASE_URL (or --database-url) is not a URL; expected {URL_FORM}"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        raise ConfigurationError(
            "SAGAQ_DATABASE_URL (or --database-url) is a SQLite URL; sagaq needs PostgreSQL: "
            f"expected {URL_FORM}. To try sagaq without a server, leave it unset: the sagaq "
            "command then starts an embedded PostgreSQL (pip install 'sagaq[embedded]')"
        )
    if backend not in ("postgresql", "postgres"):
        raise ConfigurationError(
            f"SAGAQ_DATABASE_URL (or --database-url) is a {backend!r} URL; sagaq runs on "
            f"PostgreSQL: expected {URL_FORM}"
        )


def check_schema(engine: sa.Engine) -> None:
    """The sagaq tables exist at the revision this sagaq expects, or one clear line."""
    from alembic.script import ScriptDirectory

    from sagaq.store.database import alembic_config, current_revision, safe_url

    where = safe_url(str(engine.url))
    try:
        current = current_revision(engine)
    except sa.exc.OperationalError as exc:
        raise unavailable(engine, exc) from None
    script = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    head = script.get_current_head()
    if current is None:
        raise ConfigurationError(
            f"the database at {where} has no sagaq schema: run `sagaq db upgrade`"
        )
    if current != head:
        known = {rev.revision for rev in script.walk_revisions()}
        if current not in known:
            raise ConfigurationError(
                f"the database at {where} is at schema revision {current}, newer than this "
                f"sagaq knows ({head}): upgrade sagaq"
            )
        raise ConfigurationError(
            f"the database at {where} is at schema revision {current}, this sagaq needs "
            f"{head}: run `sagaq db upgrade`"
        )


def check_secret_key(runtime: Runtime, role: str) -> None:
    """Workers and beat refuse to start without a key: a step that returns a Secret would
    fail at its seal, after its effect, and the saga would roll back for nothing."""
    if not runtime.settings.secret_key:
        raise ConfigurationError(
            f"SAGAQ_SECRET_KEY is not set: the {role} cannot seal the Secrets a step returns; "
            "generate one with `sagaq keygen` and give every process the same key"
        )


def check_start(runtime: Runtime, role: str) -> None:
    """Everything a worker or beat needs before it takes a message (`sagaq worker|beat`,
    and `celery -A sagaq worker|beat`)."""
    check_secret_key(runtime, role)
    check_schema(runtime.store.engine)


def unavailable(engine: sa.Engine, exc: sa.exc.DBAPIError) -> DatabaseUnavailable:
    from sagaq.store.database import safe_url

    reason = str(exc.orig).strip().splitlines()[0] if exc.orig else type(exc).__name__
    return DatabaseUnavailable(
        f"cannot reach the database at {safe_url(str(engine.url))}: {reason}"
    )


@contextlib.contextmanager
def database_errors(engine: sa.Engine) -> Iterator[None]:
    """An unreachable database is :class:`DatabaseUnavailable`; a missing table names
    `sagaq db upgrade`. Other database errors pass through unchanged."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
        raise unavailable(engine, exc) from None
    except sa.exc.ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) == _UNDEFINED_TABLE:
            raise ConfigurationError(
                f"the sagaq tables are missing ({str(exc.orig).splitlines()[0]}): "
                "run `sagaq db upgrade`"
            ) from None
        raise


def refuse_nul(value: Any, what: str, path: str = "$") -> None:
    """PostgreSQL text and jsonb cannot hold U+0000: say where it is, before writing."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InputError(f"{what} contains U+0000 (NUL) at {path}; PostgreSQL cannot "
                             "store it: remove it or encode the value (e.g. base64)")
    elif isinstance(value, dict):
        for k, v in value.items():
            refuse_nul(k, what, f"a key in {path}")
            refuse_nul(v, what, f"{path}[{k!r}]")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            refuse_nul(v, what, f"{path}[{i}]")
