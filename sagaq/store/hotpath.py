"""The three writes almost every saga makes, as one statement each on PostgreSQL.

Enqueueing, claiming a run, and recording a step's success with the next step's dispatch are
most of what sagaq writes. On PostgreSQL each is one statement of data-modifying CTEs, run
in autocommit: one round trip, one commit, with the guards of the general path (the run
``scheduled`` / ``running``, the saga ``running`` and not waiting, the saga row locked
first). When a guard does not hold the statement writes nothing and returns no row; the
caller then takes the general path, which finds out why and does the right thing. SQLite
always takes the general path.

The statements are built once with SQLAlchemy, compiled once, and run on the pooled
psycopg connection itself: building, hashing and binding a large construct on every call
would cost more than the round trips it saves.
"""

from __future__ import annotations

import functools
import uuid
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg.types.json import Jsonb
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

from sagaq.machine import Direction, SagaState, StepStatus, next_state
from sagaq.store.models import EVENTS, OUTBOX, RUNS, SAGAS, Json, UTCDateTime
from sagaq.store.records import Dispatch, NewRun

_EVENT_COLS = ["saga_id", "at", "kind", "step", "step_run_id", "worker", "task_id", "message",
               "data"]
_RUN_COLS = ["saga_id", "step", "step_index", "direction", "attempt", "status", "task_name",
             "compensate_task", "idempotency_key", "message_id", "deliveries", "level", "tier",
             "scheduled_at"]
_OUTBOX_COLS = ["saga_id", "step_run_id", "task_name", "args", "message_id", "available_at",
                "created_at"]


def _p(name: str, type_: Any = None) -> Any:
    """A bind parameter, cast to its type: variadic functions cannot infer one."""
    type_ = type_ if type_ is not None else sa.Text()
    return sa.cast(sa.bindparam(name, type_=type_), type_)


def _now() -> Any:
    return sa.bindparam("p_now", type_=UTCDateTime())


def _db_now() -> Any:
    """The database's clock, unless the store runs on a test clock (``p_clock``)."""
    return sa.func.coalesce(sa.cast(sa.bindparam("p_clock", type_=UTCDateTime()),
                                    UTCDateTime()), sa.func.now())


def _run_values(saga_id: Any) -> list[Any]:
    """The columns of a new scheduled run, from the ``n_*`` parameters."""
    return [
        saga_id, _p("n_step"), _p("n_index", sa.Integer()), _p("n_direction"),
        _p("n_attempt", sa.Integer()), sa.literal(StepStatus.SCHEDULED.value),
        _p("n_task"), _p("n_compensate"), _p("n_key"), _p("n_message"), sa.literal(0),
        _p("n_level", sa.Integer()), _p("n_tier"), _now(),
    ]


def _scheduled_event(saga_id: Any, run_id: Any) -> Any:
    return sa.select(
        saga_id, _now(), sa.literal("step.scheduled"), _p("n_step"), run_id, _p("p_worker"),
        _p("p_task_id"), _p("n_reason"),
        sa.func.jsonb_build_object(
            sa.literal("attempt"), _p("n_attempt", sa.Integer()), sa.literal("delay"),
            sa.literal(0.0), sa.literal("level"), _p("n_level", sa.Integer()),
            sa.literal("tier"), _p("n_tier"),
        ),
    )


@functools.cache
def _compiled(build: Any) -> tuple[str, dict[str, Any]]:
    """The SQL of a statement, and the values of the literals it carries."""
    dialect = pg_psycopg.dialect()  # type: ignore[no-untyped-call]
    compiled = build().compile(dialect=dialect)
    return str(compiled), dict(compiled.params)


def usable(conn: sa.Connection) -> bool:
    """Whether the statements can run on this connection: PostgreSQL through psycopg 3."""
    return conn.dialect.name == "postgresql" and isinstance(
        conn.connection.driver_connection, psycopg.Connection
    )


def _run(conn: sa.Connection, build: Any, params: dict[str, Any]) -> Any:
    """Execute on the driver connection; errors come back as SQLAlchemy's, so the store's
    retry (deadlocks, a dropped connection) and the pool's invalidation work as usual."""
    sql, defaults = _compiled(build)
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    try:
        return raw.execute(sql, {**defaults, **params}, prepare=True)
    except psycopg.Error as exc:
        dbapi = conn.connection.dbapi_connection
        gone = conn.dialect.is_disconnect(exc, dbapi, None)  # type: ignore[arg-type]
        if gone:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(
            sql, params, exc, psycopg.Error, connection_invalidated=gone, dialect=conn.dialect
        ) from exc


def _new_params(new: NewRun, message_id: str) -> dict[str, Any]:
    return {
        "n_step": new.step, "n_index": new.step_index, "n_direction": new.direction.value,
        "n_attempt": new.attempt, "n_task": new.task_name, "n_compensate": new.compensate_task,
        "n_key": new.idempotency_key, "n_message": message_id, "n_level": new.level,
        "n_tier": new.tier, "n_reason": new.reason or f"attempt {new.attempt}",
    }


# -- enqueue ----------------------------------------------------------------------------------


@functools.cache
def _enqueue() -> sa.Select[Any]:
    saga = (
        postgresql.insert(SAGAS)
        .values(
            id=sa.bindparam("p_saga_id"), name=sa.bindparam("p_name"),
            version=sa.bindparam("p_version"), state=SagaState.PENDING.value,
            key=sa.bindparam("p_key"), input=sa.bindparam("p_input", type_=Json),
            checkpoint=sa.bindparam("p_checkpoint", type_=Json), created_at=_now(),
            updated_at=_now(), incident=0,
        )
        .on_conflict_do_nothing(index_elements=["name", "key"])
        .returning(SAGAS.c.id)
        .cte("saga")
    )
    run = (
        sa.insert(RUNS)
        .from_select(_RUN_COLS, sa.select(*_run_values(saga.c.id)), include_defaults=False)
        .returning(RUNS.c.id, RUNS.c.saga_id)
        .cte("run")
    )
    outbox = (
        sa.insert(OUTBOX)
        .from_select(
            _OUTBOX_COLS,
            sa.select(run.c.saga_id, run.c.id, _p("n_task"),
                      sa.func.jsonb_build_array(run.c.saga_id, run.c.id), _p("n_message"),
                      _now(), _now()),
            include_defaults=False,
        )
        .cte("outbox")
    )
    enqueued = sa.select(
        saga.c.id, _now(), sa.literal("saga.enqueued"), sa.null(), sa.null(), _p("p_worker"),
        _p("p_task_id"), _p("p_message"),
        sa.func.jsonb_build_object(sa.literal("version"), _p("p_version"), sa.literal("key"),
                                   _p("p_key")),
    )
    events = (
        sa.insert(EVENTS)
        .from_select(_EVENT_COLS,
                     sa.union_all(enqueued, _scheduled_event(run.c.saga_id, run.c.id)),
                     include_defaults=False)
        .cte("events")
    )
    return sa.select(run.c.id).add_cte(outbox).add_cte(events)


def enqueue(
    conn: sa.Connection, *, saga_id: str, name: str, version: str, input: Any,
    key: str | None, first: NewRun, now: datetime,
) -> Dispatch | None:
    """Write a new saga; None when its ``key`` is taken (nothing was written)."""
    message_id = str(uuid.uuid4())
    row = _run(conn, _enqueue, {
        "p_saga_id": saga_id, "p_name": name, "p_version": version, "p_key": key,
        "p_input": Jsonb(input), "p_checkpoint": Jsonb({"results": {}, "data": {}}),
        "p_now": now, "p_worker": None, "p_task_id": None, "p_message": f"{name} enqueued",
        **_new_params(first, message_id),
    }).fetchone()
    run_id = row[0] if row else None
    if run_id is None:
        return None
    return Dispatch(first.task_name, (saga_id, run_id), message_id, 0.0)


# -- claim --------------------------------------------------------------------------------------


@functools.cache
def _claim() -> sa.Select[Any]:
    claimed = (
        sa.update(RUNS)
        .where(
            RUNS.c.id == sa.bindparam("p_run_id"),
            RUNS.c.saga_id == sa.bindparam("p_saga_id"),
            RUNS.c.status == StepStatus.SCHEDULED.value,
            SAGAS.c.id == RUNS.c.saga_id,
            SAGAS.c.state != SagaState.WAITING.value,
            SAGAS.c.state != SagaState.AWAITING_APPROVAL.value,
            # a rollback that waits in Postgres for its next compensation's backoff
            sa.or_(SAGAS.c.wake_at.is_(None), SAGAS.c.wake_at <= _db_now()),
        )
        .values(
            status=StepStatus.RUNNING.value,
            worker=sa.bindparam("p_worker"),
            task_id=sa.bindparam("p_task_id"),
            started_at=_db_now(),
            lease_expires_at=_db_now() + sa.func.make_interval(
                0, 0, 0, 0, 0, 0, sa.cast(sa.bindparam("p_lease"), sa.Float())),
            deliveries=RUNS.c.deliveries + 1,
        )
        .returning(*RUNS.c, *(c.label(f"saga__{c.name}") for c in SAGAS.c))
        .cte("claimed")
    )
    gone = sa.delete(OUTBOX).where(OUTBOX.c.step_run_id.in_(sa.select(claimed.c.id))).cte("gone")
    started = (
        sa.update(SAGAS)
        .where(
            SAGAS.c.id == sa.bindparam("p_saga_id"),
            SAGAS.c.state == SagaState.PENDING.value,
            sa.exists(sa.select(claimed.c.id)),
        )
        .values(state=sa.bindparam("p_started_state"), updated_at=_now())
        .returning(SAGAS.c.id)
        .cte("started")
    )
    kind = sa.case(
        (claimed.c.direction == Direction.FORWARD.value, "step.claimed"),
        else_="compensation.claimed",
    )
    claim_event = sa.select(
        claimed.c.saga_id, _now(), kind, claimed.c.step, claimed.c.id, _p("p_worker"),
        _p("p_task_id"),
        sa.func.concat(sa.literal("attempt "), claimed.c.attempt, sa.literal(", delivery "),
                       claimed.c.deliveries),
        sa.func.jsonb_build_object(sa.literal("attempt"), claimed.c.attempt,
                                   sa.literal("level"), claimed.c.level, sa.literal("tier"),
                                   claimed.c.tier),
    )
    start_event = sa.select(
        started.c.id, _now(), _p("p_started_kind"), sa.null(), sa.null(), _p("p_worker"),
        _p("p_task_id"), _p("p_started_message"),
        sa.func.jsonb_build_object(sa.literal("from"), sa.literal("pending"), sa.literal("to"),
                                   _p("p_started_state"), sa.literal("trigger"),
                                   sa.literal("start")),
    )
    events = (
        sa.insert(EVENTS)
        .from_select(_EVENT_COLS, sa.union_all(start_event, claim_event),
                     include_defaults=False)
        .cte("events")
    )
    # "*": the column list again would push the statement past psycopg's 4 KB cache of
    # parsed (and prepared) statements; psycopg returns aware datetimes and parsed JSON.
    return (
        sa.select(sa.literal_column("*"))
        .select_from(claimed)
        .add_cte(gone)
        .add_cte(started)
        .add_cte(events)
    )


def claim(
    conn: sa.Connection, saga_id: str, run_id: int, *, worker: str, task_id: str | None,
    lease: float, now: datetime, clock: datetime | None,
) -> Any:
    """Claim a scheduled run (and start a pending saga); the row, or None if not claimed."""
    started = next_state("*", SagaState.PENDING, "start")  # the table decides, not this SQL
    cur = _run(conn, _claim, {
        "p_run_id": run_id, "p_saga_id": saga_id, "p_worker": worker, "p_task_id": task_id,
        "p_now": now, "p_clock": clock, "p_lease": float(lease),
        "p_started_state": started.value, "p_started_kind": f"saga.{started.value}",
        "p_started_message": f"pending → {started.value}",
    })
    row = cur.fetchone()
    if row is None:
        return None
    return dict(zip((d.name for d in cur.description), row, strict=True))


# -- a step succeeded; the next one is dispatched --------------------------------------------


def _run_succeeded() -> Any:
    """The run RUNNING → SUCCEEDED, only while its saga (locked first, as on the general
    path) is running; returns the ``done`` CTE, empty when a guard does not hold."""
    lock = (
        sa.select(SAGAS.c.id, SAGAS.c.state)
        .where(SAGAS.c.id == sa.bindparam("p_saga_id"))
        .with_for_update()
        .cte("lock")
    )
    return (
        sa.update(RUNS)
        .where(
            RUNS.c.id == sa.bindparam("p_run_id"),
            RUNS.c.status == StepStatus.RUNNING.value,
            RUNS.c.deliveries == sa.bindparam("p_token", type_=sa.Integer()),  # not a zombie
            sa.exists(sa.select(lock.c.id).where(lock.c.state == SagaState.RUNNING.value)),
        )
        .values(status=StepStatus.SUCCEEDED.value,
                result=sa.bindparam("p_result", type_=Json), finished_at=_now(),
                lease_expires_at=None)
        .returning(RUNS.c.id, RUNS.c.saga_id, RUNS.c.step, RUNS.c.attempt)
        .cte("done")
    )


def _outbox_gone(done: Any) -> Any:
    """The run's own outbox rows (a recovery row the lease sweep wrote meanwhile) go with it."""
    return (
        sa.delete(OUTBOX)
        .where(OUTBOX.c.step_run_id.in_(sa.select(done.c.id)))
        .cte("run_outbox_gone")
    )


def _succeeded_event(done: Any) -> Any:
    return sa.select(
        done.c.saga_id, _now(), sa.literal("step.succeeded"), done.c.step, done.c.id,
        _p("p_worker"), _p("p_task_id"), sa.literal(""),
        sa.func.jsonb_build_object(sa.literal("attempt"), done.c.attempt),
    )


@functools.cache
def _advance() -> sa.Select[Any]:
    done = _run_succeeded()  # then either everything below happens or nothing does
    saga = (
        sa.update(SAGAS)
        .where(SAGAS.c.id == sa.bindparam("p_saga_id"), sa.exists(sa.select(done.c.id)))
        .values(updated_at=_now(), checkpoint=sa.bindparam("p_checkpoint", type_=Json))
        .returning(SAGAS.c.id)
        .cte("saga")
    )
    nxt = (
        sa.insert(RUNS)
        .from_select(_RUN_COLS, sa.select(*_run_values(done.c.saga_id)),
                     include_defaults=False)
        .returning(RUNS.c.id, RUNS.c.saga_id)
        .cte("nxt")
    )
    outbox = (
        sa.insert(OUTBOX)
        .from_select(
            _OUTBOX_COLS,
            sa.select(nxt.c.saga_id, nxt.c.id, _p("n_task"),
                      sa.func.jsonb_build_array(nxt.c.saga_id, nxt.c.id), _p("n_message"),
                      _now(), _now()),
            include_defaults=False,
        )
        .cte("outbox")
    )
    events = (
        sa.insert(EVENTS)
        .from_select(
            _EVENT_COLS,
            sa.union_all(_succeeded_event(done), _scheduled_event(nxt.c.saga_id, nxt.c.id)),
            include_defaults=False,
        )
        .cte("events")
    )
    return (sa.select(nxt.c.id).add_cte(saga).add_cte(outbox).add_cte(events)
            .add_cte(_outbox_gone(done)))


def advance(
    conn: sa.Connection, saga_id: str, run_id: int, *, result: Any,
    checkpoint: dict[str, Any], new: NewRun, worker: str | None, task_id: str | None,
    now: datetime, token: int,
) -> Dispatch | None:
    """Record a forward step's success and dispatch the next; None if a guard failed."""
    message_id = str(uuid.uuid4())
    row = _run(conn, _advance, {
        "p_saga_id": saga_id, "p_run_id": run_id, "p_result": Jsonb(result),
        "p_checkpoint": Jsonb(checkpoint), "p_now": now, "p_worker": worker,
        "p_task_id": task_id, "p_token": token, **_new_params(new, message_id),
    }).fetchone()
    if row is None or row[0] is None:
        return None
    return Dispatch(new.task_name, (saga_id, row[0]), message_id, 0.0)


# -- the last step succeeded; the saga is complete --------------------------------------------


@functools.cache
def _finish() -> sa.Select[Any]:
    done = _run_succeeded()
    saga = (
        sa.update(SAGAS)
        .where(SAGAS.c.id == sa.bindparam("p_saga_id"), sa.exists(sa.select(done.c.id)))
        .values(state=sa.bindparam("p_finished_state"), updated_at=_now(), finished_at=_now(),
                wake_at=None, checkpoint=sa.bindparam("p_checkpoint", type_=Json))
        .returning(SAGAS.c.id)
        .cte("saga")
    )
    finished = sa.select(
        saga.c.id, _now(), _p("p_finished_kind"), sa.null(), sa.null(), _p("p_worker"),
        _p("p_task_id"), _p("p_finished_message"),
        sa.func.jsonb_build_object(sa.literal("from"), sa.literal("running"),
                                   sa.literal("to"), _p("p_finished_state"),
                                   sa.literal("trigger"), sa.literal("finish")),
    )
    events = (
        sa.insert(EVENTS)
        .from_select(_EVENT_COLS, sa.union_all(_succeeded_event(done), finished),
                     include_defaults=False)
        .cte("events")
    )
    return sa.select(saga.c.id).add_cte(events).add_cte(_outbox_gone(done))


def finish(
    conn: sa.Connection, saga_id: str, run_id: int, *, result: Any,
    checkpoint: dict[str, Any], worker: str | None, task_id: str | None, now: datetime,
    token: int,
) -> bool:
    """Record the last step's success and complete the saga; False if a guard failed."""
    done = next_state("*", SagaState.RUNNING, "finish")  # the table decides, not this SQL
    row = _run(conn, _finish, {
        "p_saga_id": saga_id, "p_run_id": run_id, "p_result": Jsonb(result),
        "p_checkpoint": Jsonb(checkpoint), "p_now": now, "p_worker": worker,
        "p_task_id": task_id, "p_token": token, "p_finished_state": done.value,
        "p_finished_kind": f"saga.{done.value}",
        "p_finished_message": f"running → {done.value}",
    }).fetchone()
    return row is not None
