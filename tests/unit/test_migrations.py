"""The Alembic migrations build exactly the schema the models describe, on PostgreSQL.

Two independent checks:

* alembic's own ``compare_metadata`` between the migrated database and
  ``sagaq.store.models.metadata`` (tables, columns, types, nullability, indexes, constraints);
* the catalog of the migrated database against the catalog of ``metadata.create_all`` on the
  same backend. This one also sees what ``compare_metadata`` does not compare, such as the
  WHERE clause of a partial index. Column order is the one thing allowed to differ: a
  migration can only append a column, so the order the migrations produce is pinned on its
  own (``COLUMNS``).

The names pinned below (``COLUMNS``, ``INDEXES``, ``PG_INDEXES``, ``PG_CONSTRAINTS``) are read
off the migration files, not off what the code happens to build.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url

from sagaq.store.database import alembic_config, create_engine, upgrade
from sagaq.store.models import metadata

VERSION_TABLE = "sagaq_alembic_version"
ONE_ACTIVE = "uq_sagaq_step_runs_one_active"
WAKE_AT = "ix_sagaq_sagas_wake_at"
NOTIFICATIONS_INDEX = "ix_sagaq_notifications_saga_id"
ORPHANED = "ix_sagaq_resources_orphaned"
APPROVALS_PENDING = "ix_sagaq_approvals_pending"


LATEST = "0006"  # the newest migration: bump it with every new one

# Columns in the order the migrations create them: 0001's, then what each later one appends.
COLUMNS = {
    "sagaq_sagas": [
        "id", "name", "version", "state", "key", "input", "checkpoint", "error",
        "created_at", "updated_at", "finished_at",
        "incident", "wake_at",  # 0002
    ],
    "sagaq_step_runs": [
        "id", "saga_id", "step", "step_index", "direction", "attempt", "status", "task_name",
        "compensate_task", "idempotency_key", "message_id", "worker", "task_id", "deliveries",
        "lease_expires_at", "not_before", "result", "error", "error_type", "scheduled_at",
        "started_at", "finished_at",
        "level", "tier", "failure",  # 0002
    ],
    "sagaq_events": [
        "id", "saga_id", "at", "kind", "step", "step_run_id", "worker", "task_id", "message",
        "data",
    ],
    "sagaq_outbox": [
        "id", "saga_id", "step_run_id", "task_name", "args", "message_id", "available_at",
        "created_at",
        "notification_id",  # 0002
        "republished_at", "republished", "resource_id",  # 0003
    ],
    "sagaq_notifications": [  # 0002
        "id", "saga_id", "incident", "channel", "kind", "action", "dedup_key", "status",
        "attempts", "last_error", "note", "created_at", "updated_at", "sent_at",
        "subject",  # 0004
    ],
    "sagaq_resources": [  # 0003
        "id", "saga_id", "step", "step_run_id", "kind", "external_id", "status", "attempts",
        "last_error", "created_at", "updated_at", "released_at",
    ],
    "sagaq_approvals": [  # 0004
        "id", "saga_id", "step", "direction", "step_run_id", "rule_id", "rule_fingerprint",
        "policy_version", "status", "deadline", "requested_at", "decided_at", "decided_by",
        "decided_under", "note",
        "requested_by",  # 0005
    ],
    "sagaq_policy_fingerprints": [  # 0005
        "fingerprint", "policy", "env", "source", "worker", "first_loaded_at", "loaded_at",
    ],
}  # fmt: skip
TABLES = set(COLUMNS)
TABLES_0001 = ("sagaq_sagas", "sagaq_step_runs", "sagaq_events", "sagaq_outbox")
# Named indexes (op.create_index); unique constraints are not among them.
INDEXES_0001 = {
    "ix_sagaq_sagas_created_at",
    "ix_sagaq_sagas_active",
    "ix_sagaq_step_runs_saga_id",
    ONE_ACTIVE,
    "ix_sagaq_step_runs_active",
    "ix_sagaq_events_saga_id",
    "ix_sagaq_outbox_available_at",
}
INDEXES = {
    *INDEXES_0001,
    WAKE_AT,  # 0002
    NOTIFICATIONS_INDEX,  # 0002
    ORPHANED,  # 0003
    "ix_sagaq_approvals_saga_id",  # 0004
    APPROVALS_PENDING,  # 0004
    "ix_sagaq_step_runs_unresolved",  # 0006
}
PRIMARY_KEYS = {f"pk_{t}" for t in TABLES}
UNIQUE = {
    "uq_sagaq_sagas_name_key",
    "uq_sagaq_outbox_step_run_id",
    "uq_sagaq_outbox_notification_id",  # 0002
    "uq_sagaq_notifications_once",  # 0002
    "uq_sagaq_outbox_resource_id",  # 0003
    "uq_sagaq_resources_once",  # 0003
}
FOREIGN_KEYS = {
    f"fk_{t}_saga_id_sagaq_sagas"
    for t in TABLES - {"sagaq_sagas", "sagaq_policy_fingerprints"}  # the rest: a saga's
}
# Postgres backs every primary key and unique constraint with an index of the same name.
PG_INDEXES = PRIMARY_KEYS | UNIQUE | INDEXES
PG_CONSTRAINTS = PRIMARY_KEYS | UNIQUE | FOREIGN_KEYS


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


def reflect(conn: sa.Connection) -> dict[str, sa.Table]:
    """The sagaq tables as the database has them now (not as the models say)."""
    found = sa.MetaData()
    found.reflect(conn, only=lambda name, _: name in TABLES)
    return dict(found.tables)


def insert_notification(
    conn: sa.Connection,
    t: dict[str, sa.Table],
    saga_id: str,
    *,
    incident: int = 1,
    channel: str = "pagerduty",
    action: str = "trigger",
) -> int:
    result = conn.execute(
        t["sagaq_notifications"]
        .insert()
        .values(
            saga_id=saga_id,
            incident=incident,
            channel=channel,
            kind="page",
            action=action,
            dedup_key=f"sagaq-{saga_id}-{incident}",
            status="pending",
            attempts=0,
            created_at=now(),
            updated_at=now(),
        )
    )
    return int(result.inserted_primary_key[0])


def insert_outbox(
    conn: sa.Connection, t: dict[str, sa.Table], saga_id: str, notification_id: int | None
) -> None:
    conn.execute(
        t["sagaq_outbox"]
        .insert()
        .values(
            saga_id=saga_id,
            notification_id=notification_id,
            task_name="sagaq.notify",
            args=[notification_id],
            message_id=f"m-{notification_id}",
            available_at=now(),
            created_at=now(),
        )
    )


def count(conn: sa.Connection, table: str, saga_id: str) -> int:
    return int(
        conn.execute(
            sa.text(f"SELECT count(*) FROM {table} WHERE saga_id = :s"), {"s": saga_id}
        ).scalar_one()
    )


def check_notification_constraints(engine: sa.Engine, saga_id: str) -> None:
    """One page per incident, channel and action; one outbox row per notification."""
    with engine.connect() as conn:
        t = reflect(conn)
    with engine.begin() as conn:
        conn.execute(
            t["sagaq_sagas"]
            .insert()
            .values(
                id=saga_id,
                name="orders",
                version="v",
                state="needs_human",
                input={},
                checkpoint={},
                created_at=now(),
                updated_at=now(),
            )
        )
        first = insert_notification(conn, t, saga_id)
        resolve = insert_notification(conn, t, saga_id, action="resolve")
        insert_notification(conn, t, saga_id, channel="slack")
        insert_notification(conn, t, saga_id, incident=2)
        insert_outbox(conn, t, saga_id, first)
        insert_outbox(conn, t, saga_id, None)
        insert_outbox(conn, t, saga_id, None)  # rows for step runs carry no notification
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        insert_notification(conn, t, saga_id)  # the same page of the same incident, again
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        insert_outbox(conn, t, saga_id, first)  # a second delivery message for one page
    with engine.begin() as conn:
        insert_outbox(conn, t, saga_id, resolve)
        assert (
            count(conn, "sagaq_notifications", saga_id),
            count(conn, "sagaq_outbox", saga_id),
        ) == (
            4,
            4,
        )
    with engine.begin() as conn:  # ON DELETE CASCADE
        conn.execute(sa.text("DELETE FROM sagaq_sagas WHERE id = :s"), {"s": saga_id})
        assert count(conn, "sagaq_notifications", saga_id) == 0


T0 = datetime(2026, 11, 22, 12, 30, 15, tzinfo=UTC)


def fill_0001(engine: sa.Engine, saga_id: str) -> None:
    """A saga with a failed step run, an event and an outbox row, in the 0001 schema."""
    with engine.begin() as conn:
        t = reflect(conn)
        assert set(t) == set(TABLES_0001)
        assert "incident" not in t["sagaq_sagas"].c  # really the tables as 0001 left them
        assert "notification_id" not in t["sagaq_outbox"].c
        conn.execute(
            t["sagaq_sagas"]
            .insert()
            .values(
                id=saga_id,
                name="orders",
                version="v1",
                state="compensating",
                key="order-7",
                input={"order": 7},
                checkpoint={"results": {"reserve": {"id": "r-1"}}},
                error="card declined",
                created_at=T0,
                updated_at=T0,
            )
        )
        run = conn.execute(
            t["sagaq_step_runs"]
            .insert()
            .values(
                saga_id=saga_id,
                step="charge",
                step_index=1,
                direction="forward",
                attempt=2,
                status="failed",
                task_name="sagaq.orders.charge",
                idempotency_key="k" * 64,
                message_id="m-charge-2",
                deliveries=1,
                error="card declined",
                scheduled_at=T0,
            )
        ).inserted_primary_key[0]
        conn.execute(
            t["sagaq_events"]
            .insert()
            .values(
                saga_id=saga_id,
                at=T0,
                kind="step_failed",
                step="charge",
                step_run_id=run,
                message="card declined",
                data={"attempt": 2},
            )
        )
        conn.execute(
            t["sagaq_outbox"]
            .insert()
            .values(
                saga_id=saga_id,
                step_run_id=run,
                task_name="sagaq.orders.charge",
                args=[saga_id, run],
                message_id="m-charge-2",
                available_at=T0,
                created_at=T0,
            )
        )


def check_kept_through_0002(engine: sa.Engine, saga_id: str) -> None:
    sagas, runs = metadata.tables["sagaq_sagas"], metadata.tables["sagaq_step_runs"]
    events, outbox = metadata.tables["sagaq_events"], metadata.tables["sagaq_outbox"]
    with engine.connect() as conn:
        saga = conn.execute(
            sa.select(
                sagas.c.name, sagas.c.state, sagas.c.key, sagas.c.input, sagas.c.checkpoint,
                sagas.c.error, sagas.c.created_at, sagas.c.incident, sagas.c.wake_at,
            ).where(sagas.c.id == saga_id)
        ).one()  # fmt: skip
        run = conn.execute(
            sa.select(
                runs.c.id, runs.c.step, runs.c.attempt, runs.c.status, runs.c.error,
                runs.c.level, runs.c.tier, runs.c.failure,
            ).where(runs.c.saga_id == saga_id)
        ).one()  # fmt: skip
        event = conn.execute(
            sa.select(events.c.kind, events.c.step_run_id, events.c.data).where(
                events.c.saga_id == saga_id
            )
        ).one()
        message = conn.execute(
            sa.select(outbox.c.step_run_id, outbox.c.args, outbox.c.notification_id).where(
                outbox.c.saga_id == saga_id
            )
        ).one()
        notifications = count(conn, "sagaq_notifications", saga_id)
    assert tuple(saga) == (
        "orders",
        "compensating",
        "order-7",
        {"order": 7},
        {"results": {"reserve": {"id": "r-1"}}},
        "card declined",
        T0,
        0,  # the new incident counter starts at 0 on existing rows
        None,
    )
    assert tuple(run)[1:] == ("charge", 2, "failed", "card declined", 0, None, None)
    assert tuple(event) == ("step_failed", run.id, {"attempt": 2})
    assert tuple(message) == (run.id, [saga_id, run.id], None)
    assert notifications == 0


def check_kept_at_head(engine: sa.Engine, saga_id: str) -> None:
    assert revision_in_db(engine) == LATEST
    check_kept_through_0002(engine, saga_id)
    outbox = metadata.tables["sagaq_outbox"]
    with engine.connect() as conn:
        row = conn.execute(
            sa.select(outbox.c.republished, outbox.c.republished_at, outbox.c.resource_id).where(
                outbox.c.saga_id == saga_id
            )
        ).one()
    assert tuple(row) == (0, None, None)  # 0003's columns on an existing row


def columns_in_order(engine: sa.Engine) -> dict[str, list[str]]:
    inspector = sa.inspect(engine)
    return {t: [c["name"] for c in inspector.get_columns(t)] for t in sorted(TABLES)}


def test_pinned_columns_are_the_models_columns() -> None:
    assert {t: set(cols) for t, cols in COLUMNS.items()} == {
        t: set(metadata.tables[t].c.keys()) for t in TABLES
    }
    assert set(metadata.tables) == TABLES


# -- PostgreSQL --------------------------------------------------------------------------

PG_CATALOG = {
    "indexes": (
        "SELECT indexname, indexdef FROM pg_indexes "
        "WHERE schemaname = :schema AND tablename = ANY(:tables)"
    ),
    "columns": (
        "SELECT table_name || '.' || column_name, "
        "       concat_ws(' ', data_type, character_maximum_length, is_nullable, column_default) "
        "FROM information_schema.columns "
        "WHERE table_schema = :schema AND table_name = ANY(:tables)"
    ),
    "constraints": (
        "SELECT c.conname, t.relname || ' ' || pg_get_constraintdef(c.oid) "
        "FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
        "WHERE c.connamespace = CAST(:schema AS regnamespace) AND t.relname = ANY(:tables) "
        "AND c.contype <> 'n'"
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


def catalog_of(engine: sa.Engine, models: sa.MetaData) -> dict[str, dict[str, str]]:
    """The catalog of ``models.create_all`` in a scratch schema of the same database."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS from_models CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA from_models")
        models.create_all(conn.execution_options(schema_translate_map={None: "from_models"}))
    try:
        with engine.connect() as conn:
            return pg_catalog(conn, "from_models")
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP SCHEMA from_models CASCADE")


def test_postgres_catalog_equals_create_all(pg_engine: sa.Engine) -> None:
    expected = catalog_of(pg_engine, metadata)
    with pg_engine.connect() as conn:
        migrated = pg_catalog(conn, "public")
    assert set(expected["indexes"]) == PG_INDEXES
    assert len(expected["indexes"]) == 27  # 8 primary keys, 6 unique constraints, 13 indexes
    assert set(expected["constraints"]) == PG_CONSTRAINTS
    assert len(expected["constraints"]) == 20  # 8 primary keys, 6 unique, 6 foreign keys
    assert set(expected["columns"]) == {f"{t}.{c}" for t, cols in COLUMNS.items() for c in cols}
    for part in PG_CATALOG:
        assert migrated[part] == expected[part], part
    assert columns_in_order(pg_engine) == COLUMNS
    assert migrated["indexes"][ORPHANED] == (  # 0003's partial index (0002's: below)
        "CREATE INDEX ix_sagaq_resources_orphaned ON sagaq_resources USING btree (updated_at) "
        "WHERE ((status)::text = 'orphaned'::text)"
    )
    # the partial index keeps its predicate (Postgres prints it normalised)
    assert "WHERE ((status)::text = ANY" in migrated["indexes"][ONE_ACTIVE]
    assert (
        "'running'::character varying, 'scheduled'::character varying"
        in (migrated["indexes"][ONE_ACTIVE])
    )
    assert migrated["indexes"][ONE_ACTIVE].startswith("CREATE UNIQUE INDEX")


@pytest.fixture(scope="module")
def empty_pg(pg_admin_url: str) -> Iterator[Callable[[str], str]]:
    """Databases with no migration run yet, private to this module; dropped at its end."""
    created: list[str] = []

    def make(label: str) -> str:
        name = f"sagaq_test_{os.getpid()}_{secrets.token_hex(3)}_{label}"
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        created.append(name)
        url = make_url(pg_admin_url).set(drivername="postgresql+psycopg", database=name)
        return url.render_as_string(hide_password=False)

    yield make
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        for name in created:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def pg_0002(empty_pg: Callable[[str], str]) -> Iterator[sa.Engine]:
    url = empty_pg("at_0002")
    upgrade(url, "0002")
    engine = create_engine(url)
    assert revision_in_db(engine) == "0002"
    yield engine
    engine.dispose()


def test_postgres_0002_objects(pg_0002: sa.Engine) -> None:
    """What 0002 adds, spelled out as Postgres prints it back."""
    with pg_0002.connect() as conn:
        catalog = pg_catalog(conn, "public")
    indexes, constraints, columns = (
        catalog["indexes"],
        catalog["constraints"],
        catalog["columns"],
    )
    tables = {*TABLES_0001, "sagaq_notifications"}
    unique = {
        "uq_sagaq_sagas_name_key",
        "uq_sagaq_outbox_step_run_id",
        "uq_sagaq_outbox_notification_id",
        "uq_sagaq_notifications_once",
    }
    assert set(indexes) == {f"pk_{t}" for t in tables} | unique | INDEXES_0001 | {
        WAKE_AT,
        NOTIFICATIONS_INDEX,
    }
    assert indexes[WAKE_AT] == (
        "CREATE INDEX ix_sagaq_sagas_wake_at ON sagaq_sagas USING btree (wake_at) "
        "WHERE ((state)::text = 'waiting'::text)"
    )
    assert indexes["ix_sagaq_notifications_saga_id"] == (
        "CREATE INDEX ix_sagaq_notifications_saga_id ON sagaq_notifications "
        "USING btree (saga_id, id)"
    )
    assert indexes["uq_sagaq_notifications_once"] == (
        "CREATE UNIQUE INDEX uq_sagaq_notifications_once ON sagaq_notifications "
        "USING btree (saga_id, incident, channel, kind, action)"
    )
    assert indexes["uq_sagaq_outbox_notification_id"] == (
        "CREATE UNIQUE INDEX uq_sagaq_outbox_notification_id ON sagaq_outbox "
        "USING btree (notification_id)"
    )
    assert constraints["uq_sagaq_notifications_once"] == (
        "sagaq_notifications UNIQUE (saga_id, incident, channel, kind, action)"
    )
    assert constraints["uq_sagaq_outbox_notification_id"] == (
        "sagaq_outbox UNIQUE (notification_id)"
    )
    assert constraints["pk_sagaq_notifications"] == "sagaq_notifications PRIMARY KEY (id)"
    assert constraints["fk_sagaq_notifications_saga_id_sagaq_sagas"] == (
        "sagaq_notifications FOREIGN KEY (saga_id) REFERENCES sagaq_sagas(id) ON DELETE CASCADE"
    )
    assert columns["sagaq_sagas.incident"] == "integer NO 0"
    assert columns["sagaq_sagas.wake_at"] == "timestamp with time zone YES"
    assert columns["sagaq_step_runs.level"] == "integer NO 0"
    assert columns["sagaq_step_runs.tier"] == "character varying 100 YES"
    assert columns["sagaq_step_runs.failure"] == "character varying 32 YES"
    assert columns["sagaq_outbox.notification_id"] == "bigint YES"
    assert columns["sagaq_notifications.dedup_key"] == "character varying 255 NO"


def test_postgres_0002_notifications_are_once_per_incident(pg_0002: sa.Engine) -> None:
    check_notification_constraints(pg_0002, "pg-saga-n")


def test_postgres_upgrade_from_0001_keeps_the_rows(empty_pg: Callable[[str], str]) -> None:
    url = empty_pg("from_0001")
    upgrade(url, "0001")
    engine = create_engine(url)
    try:
        assert revision_in_db(engine) == "0001"
        fill_0001(engine, "old-saga")
        upgrade(url, "0002")
        assert revision_in_db(engine) == "0002"
        check_kept_through_0002(engine, "old-saga")
        upgrade(url)
        check_kept_at_head(engine, "old-saga")
    finally:
        engine.dispose()


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


def copy_of_metadata() -> sa.MetaData:
    copy = sa.MetaData(naming_convention=metadata.naming_convention)
    for table in metadata.sorted_tables:
        table.to_metadata(copy)
    return copy


def test_compare_notices_drift(pg_engine: sa.Engine) -> None:
    """The comparison above is live: index drift either way is reported."""
    assert diffs(pg_engine, copy_of_metadata()) == []
    drifted = copy_of_metadata()
    sa.Index("ix_sagaq_events_kind", drifted.tables["sagaq_events"].c.kind)
    found = diffs(pg_engine, drifted)
    assert [(d[0], d[1].name) for d in found] == [("add_index", "ix_sagaq_events_kind")]

    fewer = copy_of_metadata()
    events = fewer.tables["sagaq_events"]
    events.indexes.discard(next(i for i in events.indexes if i.name == "ix_sagaq_events_saga_id"))
    found = diffs(pg_engine, fewer)
    assert [(d[0], d[1].name) for d in found] == [("remove_index", "ix_sagaq_events_saga_id")]


def test_catalog_comparison_notices_a_changed_predicate(pg_engine: sa.Engine) -> None:
    """A partial index whose WHERE differs between models and migration is caught."""
    drifted = copy_of_metadata()
    index = next(i for i in drifted.tables["sagaq_step_runs"].indexes if i.name == ONE_ACTIVE)
    index.dialect_options["postgresql"]["where"] = sa.text("status = 'running'")
    catalog = catalog_of(pg_engine, drifted)["indexes"]
    with pg_engine.connect() as conn:
        migrated = pg_catalog(conn, "public")["indexes"]
    assert {k for k in catalog if catalog[k] != migrated[k]} == {ONE_ACTIVE}


def test_catalog_comparison_notices_a_changed_column_or_constraint(pg_engine: sa.Engine) -> None:
    """The catalog comparison still sees a changed type or a lost constraint."""
    drifted = copy_of_metadata()
    drifted.tables["sagaq_step_runs"].c.tier.type = sa.String(50)
    notifications = drifted.tables["sagaq_notifications"]
    once = next(c for c in notifications.constraints if c.name == "uq_sagaq_notifications_once")
    notifications.constraints.discard(once)
    catalog = catalog_of(pg_engine, drifted)
    with pg_engine.connect() as conn:
        migrated = pg_catalog(conn, "public")
    columns = catalog["columns"]
    assert {k for k in columns if columns[k] != migrated["columns"][k]} == {
        "sagaq_step_runs.tier"
    }
    assert set(migrated["constraints"]) - set(catalog["constraints"]) == {
        "uq_sagaq_notifications_once"
    }
