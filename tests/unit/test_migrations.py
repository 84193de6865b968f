"""The Alembic migrations build exactly the schema the models describe, on SQLite and Postgres.

Two independent checks per backend:

* alembic's own ``compare_metadata`` between the migrated database and
  ``sagaq.store.models.metadata`` (tables, columns, types, nullability, indexes, constraints);
* the catalog of the migrated database against the catalog of ``metadata.create_all`` on the
  same backend. This one also sees what ``compare_metadata`` does not compare, such as the
  WHERE clause of a partial index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from sagaq.store.database import alembic_config, create_engine, upgrade
from sagaq.store.models import metadata

VERSION_TABLE = "sagaq_alembic_version"
TABLES = {"sagaq_sagas", "sagaq_step_runs", "sagaq_events", "sagaq_outbox"}
ONE_ACTIVE = "uq_sagaq_step_runs_one_active"


LATEST = "0002"  # the newest migration: bump it with every new one


def head(url: str) -> str:
    rev = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert rev is not None
    return rev


def diffs(engine: sa.Engine, target: sa.MetaData = metadata) -> list[Any]:
    with engine.connect() as conn:
        # compare_type stays on: the UTCDateTime TypeDecorator compares clean against the
        # migration's DateTime(timezone=True) on both backends, so no type diff is hidden.
        ctx = MigrationContext.configure(
            conn, opts={"compare_type": True, "version_table": VERSION_TABLE}
        )
        return list(compare_metadata(ctx, target))


def revision_in_db(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
        rev: str | None = ctx.get_current_revision()
        return rev


def sagaq_tables(engine: sa.Engine) -> set[str]:
    return {t for t in sa.inspect(engine).get_table_names() if t.startswith("sagaq_")}


def now() -> datetime:
    return datetime.now(UTC)


def insert_saga(conn: sa.Connection, saga_id: str) -> None:
    conn.execute(
        metadata.tables["sagaq_sagas"]
        .insert()
        .values(
            id=saga_id,
            name="orders",
            version="v",
            state="running",
            key=None,
            input={},
            checkpoint={},
            created_at=now(),
            updated_at=now(),
        )
    )


def insert_run(conn: sa.Connection, saga_id: str, status: str, n: int) -> None:
    conn.execute(
        metadata.tables["sagaq_step_runs"]
        .insert()
        .values(
            saga_id=saga_id,
            step=f"s{n}",
            step_index=n,
            direction="forward",
            attempt=1,
            status=status,
            task_name=f"sagaq.orders.s{n}",
            idempotency_key="k" * 64,
            message_id=f"m{n}",
            deliveries=0,
            scheduled_at=now(),
        )
    )


def check_one_active_step_per_saga(engine: sa.Engine, saga_id: str) -> None:
    """The database itself refuses a second scheduled-or-running run of one saga."""
    with engine.begin() as conn:
        insert_saga(conn, saga_id)
        insert_saga(conn, saga_id + "-other")
        insert_run(conn, saga_id, "succeeded", 0)
        insert_run(conn, saga_id, "failed", 1)
        insert_run(conn, saga_id, "running", 2)  # one active run: fine
        insert_run(conn, saga_id + "-other", "scheduled", 0)  # another saga's: fine
    for status in ("running", "scheduled"):
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            insert_run(conn, saga_id, status, 3)
    with engine.begin() as conn:
        insert_run(conn, saga_id, "unknown", 3)  # not active: allowed next to the running one
        runs = (
            conn.execute(
                sa.text("SELECT status FROM sagaq_step_runs WHERE saga_id = :s ORDER BY id"),
                {"s": saga_id},
            )
            .scalars()
            .all()
        )
    assert runs == ["succeeded", "failed", "running", "unknown"]


# -- SQLite ------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sagaq.db'}"


@pytest.fixture
def sqlite_engine(sqlite_url: str) -> Iterator[sa.Engine]:
    upgrade(sqlite_url)
    engine = create_engine(sqlite_url)
    yield engine
    engine.dispose()


def sqlite_catalog(engine: sa.Engine) -> dict[str, tuple[str, str]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT name, type, sql FROM sqlite_master "
            "WHERE tbl_name IN ('sagaq_sagas', 'sagaq_step_runs', 'sagaq_events', 'sagaq_outbox')"
            " AND sql IS NOT NULL"
        ).all()
    return {name: (kind, sql) for name, kind, sql in rows}


def test_sqlite_upgrade_reaches_head(sqlite_url: str, sqlite_engine: sa.Engine) -> None:
    assert revision_in_db(sqlite_engine) == head(sqlite_url) == LATEST
    assert sagaq_tables(sqlite_engine) == TABLES | {VERSION_TABLE}


def test_sqlite_schema_matches_models(sqlite_engine: sa.Engine) -> None:
    assert diffs(sqlite_engine) == []


def test_sqlite_catalog_equals_create_all(sqlite_engine: sa.Engine, tmp_path: Path) -> None:
    reference = create_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    metadata.create_all(reference)
    try:
        expected = sqlite_catalog(reference)
    finally:
        reference.dispose()
    assert len(expected) == len(TABLES) + 7  # 4 tables, 7 named indexes
    assert sqlite_catalog(sqlite_engine) == expected


def copy_of_metadata() -> sa.MetaData:
    copy = sa.MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(copy)
    return copy


def test_compare_notices_drift(sqlite_engine: sa.Engine) -> None:
    """The comparison above is live: index drift either way is reported."""
    assert diffs(sqlite_engine, copy_of_metadata()) == []
    drifted = copy_of_metadata()
    sa.Index("ix_sagaq_events_kind", drifted.tables["sagaq_events"].c.kind)
    found = diffs(sqlite_engine, drifted)
    assert [(d[0], d[1].name) for d in found] == [("add_index", "ix_sagaq_events_kind")]

    fewer = copy_of_metadata()
    events = fewer.tables["sagaq_events"]
    events.indexes.discard(next(i for i in events.indexes if i.name == "ix_sagaq_events_saga_id"))
    found = diffs(sqlite_engine, fewer)
    assert [(d[0], d[1].name) for d in found] == [("remove_index", "ix_sagaq_events_saga_id")]


def test_catalog_comparison_notices_a_changed_predicate(
    sqlite_engine: sa.Engine, tmp_path: Path
) -> None:
    """A partial index whose WHERE differs between models and migration is caught."""
    drifted = copy_of_metadata()
    index = next(i for i in drifted.tables["sagaq_step_runs"].indexes if i.name == ONE_ACTIVE)
    index.dialect_options["sqlite"]["where"] = sa.text("status = 'running'")
    reference = create_engine(f"sqlite:///{tmp_path / 'drifted.db'}")
    drifted.create_all(reference)
    try:
        catalog = sqlite_catalog(reference)
    finally:
        reference.dispose()
    migrated = sqlite_catalog(sqlite_engine)
    # (to_metadata() reorders table constraints, so only the indexes are compared here)
    changed = {k for k, (kind, sql) in catalog.items() if kind == "index" and sql != migrated[k][1]}
    assert changed == {ONE_ACTIVE}


def test_sqlite_one_active_index_has_its_where_clause(sqlite_engine: sa.Engine) -> None:
    with sqlite_engine.connect() as conn:
        sql = conn.exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (ONE_ACTIVE,)
        ).scalar_one()
    assert sql == (
        "CREATE UNIQUE INDEX uq_sagaq_step_runs_one_active ON sagaq_step_runs (saga_id) "
        "WHERE status IN ('running', 'scheduled')"
    )


def test_sqlite_one_active_step_per_saga(sqlite_engine: sa.Engine) -> None:
    check_one_active_step_per_saga(sqlite_engine, "saga-1")


def test_sqlite_downgrade_to_base_drops_every_table(
    sqlite_url: str, sqlite_engine: sa.Engine
) -> None:
    command.downgrade(alembic_config(sqlite_url), "base")
    assert sagaq_tables(sqlite_engine) == {VERSION_TABLE}  # alembic keeps its own, empty
    assert revision_in_db(sqlite_engine) is None
    with sqlite_engine.connect() as conn:
        leftovers = (
            conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE name LIKE 'ix\\_%' ESCAPE '\\' "
                "OR name LIKE 'uq\\_%' ESCAPE '\\'"
            )
            .scalars()
            .all()
        )
    assert leftovers == []

    upgrade(sqlite_url)  # and back up: the round trip is clean
    assert revision_in_db(sqlite_engine) == LATEST
    assert diffs(sqlite_engine) == []


# -- PostgreSQL --------------------------------------------------------------------------

PG_CATALOG = {
    "indexes": (
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = :schema AND tablename = ANY(:tables)"
    ),
    "columns": (
        "SELECT table_name || '.' || column_name, "
        "       concat_ws(' ', ordinal_position, data_type, character_maximum_length, "
        "                 is_nullable, column_default) "
        "FROM information_schema.columns "
        "WHERE table_schema = :schema AND table_name = ANY(:tables)"
    ),
    "constraints": (
        "SELECT c.conname, t.relname || ' ' || pg_get_constraintdef(c.oid) "
        "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
        "WHERE c.connamespace = CAST(:schema AS regnamespace) AND t.relname = ANY(:tables)"
    ),
}


def pg_catalog(conn: sa.Connection, schema: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for part, query in PG_CATALOG.items():
        rows = conn.execute(sa.text(query), {"schema": schema, "tables": sorted(TABLES)}).all()
        out[part] = {name: str(text).replace(f"{schema}.", "") for name, text in rows}
    return out


@pytest.fixture(scope="module")
def pg_url(make_database: Callable[[str], str]) -> str:
    return make_database("unit_migrations")  # created and migrated to head by the fixture


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(pg_url)
    yield engine
    engine.dispose()


def test_postgres_upgrade_reaches_head(pg_url: str, pg_engine: sa.Engine) -> None:
    assert revision_in_db(pg_engine) == head(pg_url) == LATEST
    assert sagaq_tables(pg_engine) == TABLES | {VERSION_TABLE}


def test_postgres_schema_matches_models(pg_engine: sa.Engine) -> None:
    assert diffs(pg_engine) == []


def test_postgres_catalog_equals_create_all(pg_engine: sa.Engine) -> None:
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS from_models CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA from_models")
        metadata.create_all(conn.execution_options(schema_translate_map={None: "from_models"}))
    try:
        with pg_engine.connect() as conn:
            migrated, expected = pg_catalog(conn, "public"), pg_catalog(conn, "from_models")
    finally:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA from_models CASCADE")
    assert len(expected["indexes"]) == 13  # 4 primary keys, 2 unique constraints, 7 indexes
    for part in PG_CATALOG:
        assert migrated[part] == expected[part], part
    # the partial index keeps its predicate (Postgres prints it normalised)
    assert "WHERE ((status)::text = ANY" in migrated["indexes"][ONE_ACTIVE]
    assert (
        "'running'::character varying, 'scheduled'::character varying"
        in (migrated["indexes"][ONE_ACTIVE])
    )
    assert migrated["indexes"][ONE_ACTIVE].startswith("CREATE UNIQUE INDEX")


def test_postgres_one_active_step_per_saga(pg_engine: sa.Engine) -> None:
    try:
        check_one_active_step_per_saga(pg_engine, "pg-saga-1")
    finally:
        with pg_engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM sagaq_sagas WHERE id LIKE 'pg-saga-1%%'")


def test_postgres_downgrade_and_upgrade_round_trip(pg_url: str, pg_engine: sa.Engine) -> None:
    command.downgrade(alembic_config(pg_url), "base")
    assert sagaq_tables(pg_engine) == {VERSION_TABLE}
    assert revision_in_db(pg_engine) is None
    with pg_engine.connect() as conn:
        leftovers = (
            conn.exec_driver_sql(
                "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND relname LIKE 'sagaq%%' "
                "AND relname NOT LIKE 'sagaq_alembic_version%%'"
            )
            .scalars()
            .all()
        )
    assert leftovers == []  # no stray sequences or indexes

    upgrade(pg_url)
    assert revision_in_db(pg_engine) == LATEST
    assert diffs(pg_engine) == []
