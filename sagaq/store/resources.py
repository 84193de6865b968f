"""External resources steps create, and releasing the ones a finished saga left behind."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from sagaq.kinds import Action, Kind
from sagaq.machine import StepStatus
from sagaq.store.db import Database
from sagaq.store.faults import Write
from sagaq.store.lifecycle import notify
from sagaq.store.models import OUTBOX, RESOURCES, RUNS, SAGAS, UTCDateTime
from sagaq.store.records import Dispatch, ResourceRecord
from sagaq.store.timeline import Timeline, resource_record, saga_record

RELEASING_LEASE = timedelta(seconds=300)  # a releaser that died is retried after this



def register_resource(
    db: Database, saga_id: str, run_id: int, step: str, kind: str, external_id: str,
    *, token: int | None = None,
) -> bool:
    """Record, and commit at once, that a step created ``kind`` ``external_id``.

    Committed before the step returns, so a worker killed right after creating the
    resource still leaves its trace. Registering the same resource twice is a no-op.
    With ``token`` (the attempt's delivery), only the live attempt registers: a zombie,
    whose run was taken over or whose saga moved on, writes nothing.
    """
    now = db.clock()
    with db.write(Write.RESOURCE) as conn:
        values = sa.select(
            sa.literal(saga_id), sa.literal(step), sa.literal(run_id), sa.literal(kind),
            sa.literal(external_id), sa.literal("held"), sa.literal(0),
            sa.literal(now, UTCDateTime()), sa.literal(now, UTCDateTime()),
        )
        if token is not None:
            values = values.where(sa.exists().where(
                RUNS.c.id == run_id, RUNS.c.status == StepStatus.RUNNING.value,
                RUNS.c.deliveries == token, RUNS.c.lease_expires_at > db.db_now(),
            ))
        stmt = insert(RESOURCES).from_select(
            ["saga_id", "step", "step_run_id", "kind", "external_id", "status", "attempts",
             "created_at", "updated_at"], values,
        ).on_conflict_do_nothing()
        new = conn.execute(stmt.returning(RESOURCES.c.id)).scalar() is not None
        if new:
            tl = Timeline(saga_id, now)
            tl.add("resource.registered", step=step, run_id=run_id,
                   message=f"{kind} {external_id}", data={"kind": kind, "id": external_id})
            tl.flush(conn)
    return new


def resources(db: Database, saga_id: str) -> list[ResourceRecord]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(RESOURCES).where(RESOURCES.c.saga_id == saga_id).order_by(RESOURCES.c.id)
        )
        return [resource_record(r) for r in rows]


def begin_release(db: Database, resource_id: int) -> ResourceRecord | None:
    """releasing (fresh, or stale) → claimed by this releaser; None if someone has it."""
    now = db.clock()
    with db.write(Write.BEGIN_RELEASE) as conn:
        row = conn.execute(
            sa.update(RESOURCES)
            .where(
                RESOURCES.c.id == resource_id,
                RESOURCES.c.status == "releasing",
                sa.or_(
                    RESOURCES.c.attempts == 0,
                    RESOURCES.c.updated_at < db.db_in(-RELEASING_LEASE.total_seconds()),
                    # a retry scheduled by end_release: its outbox row is due
                    sa.exists().where(
                        OUTBOX.c.resource_id == RESOURCES.c.id,
                        OUTBOX.c.available_at <= db.db_now(),
                    ),
                ),
            )
            .values(attempts=RESOURCES.c.attempts + 1, updated_at=now)
            .returning(*RESOURCES.c)
        ).first()
    return resource_record(row) if row is not None else None


def end_release(
    db: Database, res: ResourceRecord, *, released: bool, error: str | None = None,
    retry_in: float | None = None, durable: bool = False,
) -> list[Dispatch]:
    """released | failed, which pages, in the same transaction (a new incident of the
    saga: a crash between the two must not lose the page) | a retry in ``retry_in`` s.

    Fenced by the attempt: a releaser whose attempt was taken over records nothing.
    """
    now = db.clock()
    with db.write(Write.END_RELEASE) as conn:
        tl = Timeline(res.saga_id, now)
        mine = conn.execute(
            sa.update(RESOURCES)
            .where(RESOURCES.c.id == res.id, RESOURCES.c.status == "releasing",
                   RESOURCES.c.attempts == res.attempts)
            .values(updated_at=now)
            .returning(RESOURCES.c.id)
        ).first()
        if mine is None:
            return []
        row = conn.execute(sa.select(OUTBOX).where(OUTBOX.c.resource_id == res.id)).first()
        if retry_in is not None and row is not None:
            conn.execute(
                sa.update(OUTBOX).where(OUTBOX.c.id == row.id)
                .values(available_at=now + timedelta(seconds=retry_in), republished=0,
                        # published now with a countdown, or due for the reconciler
                        republished_at=None if durable else now)
            )
            conn.execute(
                sa.update(RESOURCES).where(RESOURCES.c.id == res.id)
                .values(last_error=error, updated_at=now)
            )
            tl.add("resource.retry", step=res.step,
                   message=f"{res.kind} {res.external_id}: {error}; again in {retry_in:.1f}s",
                   data={"kind": res.kind, "id": res.external_id, "attempt": res.attempts})
            tl.flush(conn)
            if durable:  # too long for a countdown: published by the reconciler when due
                return []
            return [Dispatch(row.task_name, (row.args[0], row.args[1]), row.message_id,
                             retry_in)]
        conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.resource_id == res.id))
        conn.execute(
            sa.update(RESOURCES).where(RESOURCES.c.id == res.id).values(
                status="released" if released else "failed",
                last_error=error,
                updated_at=now,
                released_at=now if released else None,
            )
        )
        what = "released" if released else "release_failed"
        tl.add(f"resource.{what}", step=res.step,
               message=f"{res.kind} {res.external_id}" + (f": {error}" if error else ""),
               data={"kind": res.kind, "id": res.external_id, "attempt": res.attempts})
        pages = [] if released else _page_release(db, conn, res, tl)
        tl.flush(conn)
    return pages


def _page_release(db: Database, conn: sa.Connection, res: ResourceRecord,
                  tl: Timeline) -> list[Dispatch]:
    """A resource that could not be released: one page, a new incident of the saga."""
    row = conn.execute(
        sa.update(SAGAS)
        .where(SAGAS.c.id == res.saga_id)
        .values(incident=SAGAS.c.incident + 1, updated_at=tl.now)
        .returning(*SAGAS.c)
    ).one()
    tl.add("ladder.rung", message=f"rung 4: page: {res.kind} {res.external_id} not released",
           data={"level": 4, "applicable": True, "action": "page",
                 "reason": f"releasing orphaned {res.kind} {res.external_id} failed",
                 "direction": "compensate"})
    return notify(db, conn, saga_record(row), Kind.PAGE, Action.TRIGGER, tl,
                        note=f"orphaned {res.kind} {res.external_id} could not be released")
