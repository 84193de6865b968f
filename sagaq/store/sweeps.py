"""Reconciler sweeps: small, bounded, idempotent batches over active rows only.

Each sweep is one transaction that first takes a transaction-level advisory lock of its own
(on PostgreSQL): a second beat running the same sweep at the same moment skips it instead of
doing the work twice. Rows are also taken ``FOR UPDATE SKIP LOCKED``. Every query is served
by a partial index on active rows, so the cost does not grow with finished sagas.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from datetime import timedelta

import sqlalchemy as sa

from sagaq.machine import SagaState, StepStatus
from sagaq.store.db import Database
from sagaq.store.faults import Write
from sagaq.store.lifecycle import RELEASE_TASK, outbox, transition
from sagaq.store.models import OUTBOX, RESOURCES, RUNS, SAGAS
from sagaq.store.records import Dispatch, SagaRecord
from sagaq.store.timeline import Timeline, saga_record, step_run_record


def _lock_key(name: str) -> int:
    return zlib.crc32(f"sagaq.sweep.{name}".encode())



def _sweep(
    db: Database, name: Write, body: Callable[[sa.Connection], list[Dispatch]]
) -> list[Dispatch]:
    with db.write(name) as conn:
        if conn.dialect.name == "postgresql":
            got = conn.execute(
                sa.select(sa.func.pg_try_advisory_xact_lock(_lock_key(name.value)))
            ).scalar()
            if not got:
                return []  # another reconciler is running this sweep right now
        return body(conn)


def wake_due(db: Database, batch: int = 100) -> list[Dispatch]:
    """Sagas whose durable wait is over: waiting → running, and their message out."""

    def body(conn: sa.Connection) -> list[Dispatch]:
        now = db.clock()
        out: list[Dispatch] = []
        rows = conn.execute(
            sa.select(SAGAS)
            .where(SAGAS.c.state.in_([SagaState.WAITING.value,
                                      SagaState.COMPENSATING.value]),
                   SAGAS.c.wake_at <= db.db_now())
            .order_by(SAGAS.c.wake_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        for row in rows:
            saga: SagaRecord = saga_record(row)
            tl = Timeline(saga.id, now, worker="reconciler")
            if saga.state is SagaState.WAITING:
                transition(db, conn, saga, "wake", tl)
            else:  # a rollback's compensation whose backoff waited in Postgres
                conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga.id)
                             .values(wake_at=None, updated_at=now))
                tl.add("rollback.woken", message="the compensation's backoff is over")
            due = conn.execute(
                sa.select(OUTBOX)
                .join(RUNS, RUNS.c.id == OUTBOX.c.step_run_id)
                .where(
                    OUTBOX.c.saga_id == saga.id,
                    RUNS.c.status == StepStatus.SCHEDULED.value,
                )
            ).all()
            out += [Dispatch(r.task_name, (r.args[0], r.args[1]), r.message_id) for r in due]
            if due:  # published now: the republish sweep counts its grace from here
                conn.execute(sa.update(OUTBOX).where(OUTBOX.c.id.in_([r.id for r in due]))
                             .values(republished_at=now))
            tl.flush(conn)
        return out

    return _sweep(db, Write.WAKE, body)


def republish_overdue(db: Database, grace: float, batch: int = 500) -> list[Dispatch]:
    """Outbox rows whose message should have been consumed by now: publish them again.

    Covers a crash between commit and publish, and messages lost with Redis. A row is
    tried again after ``grace`` seconds, then after twice that, and so on (at most an
    hour apart), so a long queue is not flooded with copies.
    """

    def body(conn: sa.Connection) -> list[Dispatch]:
        now = db.clock()
        db_now = db.db_now()
        # Only a step run's message waits with its saga; a notice (the approval request
        # itself) is always sent.
        held = sa.and_(OUTBOX.c.step_run_id.is_not(None), sa.exists().where(
            SAGAS.c.id == OUTBOX.c.saga_id,
            sa.or_(
                SAGAS.c.state.in_([SagaState.WAITING.value,
                                   SagaState.AWAITING_APPROVAL.value]),
                SAGAS.c.wake_at > db_now,
            ),
        ))
        # The backoff is in the query, not applied afterwards: rows in backoff never
        # take the batch's places from a newer lost message.
        wait = sa.func.least(grace * sa.func.power(2, sa.func.least(OUTBOX.c.republished,
                                                                    12)), 3600.0)
        again_at = OUTBOX.c.republished_at + sa.func.make_interval(0, 0, 0, 0, 0, 0, wait)
        # A notice or release retried later with a wait too long for a countdown was
        # never published: it is due at available_at, without the grace.
        due = sa.and_(OUTBOX.c.step_run_id.is_(None), OUTBOX.c.republished_at.is_(None),
                      OUTBOX.c.available_at > OUTBOX.c.created_at,
                      OUTBOX.c.available_at <= db_now)
        overdue = sa.and_(
            OUTBOX.c.available_at <= db.db_in(-grace),
            sa.or_(OUTBOX.c.republished_at.is_(None), again_at <= db_now),
        )
        rows = conn.execute(
            sa.select(OUTBOX)
            .where(sa.or_(due, overdue), ~held)
            .order_by(sa.func.coalesce(OUTBOX.c.republished_at, OUTBOX.c.available_at))
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        out: list[Dispatch] = []
        for r in rows:
            conn.execute(
                sa.update(OUTBOX)
                .where(OUTBOX.c.id == r.id)
                .values(republished_at=now if db.fixed_clock else sa.func.now(),
                        republished=OUTBOX.c.republished + 1)
            )
            out.append(Dispatch(r.task_name, (r.args[0], r.args[1]), r.message_id))
            if r.saga_id is not None:  # so the gap on the timeline has its reason
                waited = (now - r.available_at).total_seconds()
                tl = Timeline(r.saga_id, now, worker="reconciler")
                tl.add("message.republished", run_id=r.step_run_id,
                       message=f"{r.task_name} not taken after {waited:.0f}s (lost with "
                               f"the broker?): published again, copy {r.republished + 1}",
                       data={"task": r.task_name, "message_id": r.message_id,
                             "copy": r.republished + 1})
                tl.flush(conn)
        return out

    return _sweep(db, Write.REPUBLISH, body)


def expired_leases(db: Database, batch: int = 500) -> list[Dispatch]:
    """Running step runs whose lease expired (the worker died): send a worker to find out.

    The message goes to the step's own task, so the step's ``verify`` decides; an outbox
    row is written too, so that if this message is lost it is published again.
    """

    def body(conn: sa.Connection) -> list[Dispatch]:
        now = db.clock()
        has_row = sa.exists().where(OUTBOX.c.step_run_id == RUNS.c.id)
        rows = conn.execute(
            sa.select(RUNS)
            .where(
                sa.or_(RUNS.c.status == StepStatus.RUNNING.value,
                       sa.and_(RUNS.c.status == StepStatus.UNKNOWN.value,
                               RUNS.c.finished_at.is_(None))),
                RUNS.c.lease_expires_at <= db.db_now(),
                ~has_row,
            )
            .order_by(RUNS.c.lease_expires_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        out: list[Dispatch] = []
        for row in rows:
            run = step_run_record(row)
            dispatch = outbox(conn, run.saga_id, run.task_name, run.id, now,
                                    ref="step_run_id")
            tl = Timeline(run.saga_id, now, worker="reconciler")
            tl.run_event(run, "lease_expired",
                         f"lease of {run.worker} expired; a worker will find out what happened")
            tl.flush(conn)
            out.append(dispatch)
        return out

    return _sweep(db, Write.LEASES, body)


def stalled_rollbacks(db: Database, deadline: float, batch: int = 100) -> list[Dispatch]:
    """Rollbacks that made no progress for ``deadline`` seconds: a human is paged."""

    def body(conn: sa.Connection) -> list[Dispatch]:
        now = db.clock()
        live = sa.exists().where(   # a long compensation under a live lease is progress
            RUNS.c.saga_id == SAGAS.c.id,
            RUNS.c.status.in_([StepStatus.RUNNING.value, StepStatus.UNKNOWN.value]),
            RUNS.c.lease_expires_at > db.db_now(),
        )
        rows = conn.execute(
            sa.select(SAGAS)
            .where(
                SAGAS.c.state == SagaState.COMPENSATING.value,
                SAGAS.c.updated_at <= now - timedelta(seconds=deadline),
                sa.or_(SAGAS.c.wake_at.is_(None), SAGAS.c.wake_at <= db.db_now()),
                ~live,
            )
            .order_by(SAGAS.c.updated_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        out: list[Dispatch] = []
        for row in rows:
            saga = saga_record(row)
            tl = Timeline(saga.id, now, worker="reconciler")
            tl.add("ladder.rung", message="rung 4: page: the rollback made no progress",
                   data={"level": 4, "applicable": True, "action": "page",
                         "reason": f"no progress for {deadline:g}s",
                         "direction": "compensate"})
            _, pages = transition(
                db, conn, saga, "escalate", tl,
                error=f"the rollback made no progress for {deadline:g}s",
            )
            out += pages
            tl.flush(conn)
        return out

    return _sweep(db, Write.STALLED, body)


def orphans(db: Database, batch: int = 100) -> list[Dispatch]:
    """Resources left held by sagas that ended without undoing them: release them."""

    def body(conn: sa.Connection) -> list[Dispatch]:
        now = db.clock()
        rows = conn.execute(
            sa.select(RESOURCES)
            .where(RESOURCES.c.status == "orphaned")
            .order_by(RESOURCES.c.updated_at)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        out: list[Dispatch] = []
        for r in rows:
            conn.execute(
                sa.update(RESOURCES)
                .where(RESOURCES.c.id == r.id)
                .values(status="releasing", updated_at=now)
            )
            out.append(outbox(conn, r.saga_id, RELEASE_TASK, r.id, now,
                                    ref="resource_id"))
            tl = Timeline(r.saga_id, now, worker="reconciler")
            tl.add("resource.orphaned", step=r.step,
                   message=f"{r.kind} {r.external_id}: held after the saga ended; releasing",
                   data={"kind": r.kind, "id": r.external_id})
            tl.flush(conn)
        return out

    return _sweep(db, Write.ORPHANS, body)
