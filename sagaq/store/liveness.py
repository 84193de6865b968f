"""Liveness (DESIGN §4.13): every saga that is not finished has a way forward, or is listed.

A way forward is one of:

- an attempt in hand: a run running, or one whose unknown outcome is being resolved (a lapsed
  lease counts: the lease sweep sends a worker to it);
- a scheduled run with its outbox row, which the reconciler publishes (at ``wake_at`` if the
  saga waits in Postgres);
- a pending approval whose request was sent, or is on its way (pending with its message);
- ``needs_human`` with every page of the incident sent, or on its way.

:meth:`Liveness.stranded` is that rule as one query (``sagaq doctor``, the chaos run and the
crash-point sweep read it); :meth:`Liveness.repair` gives a stranded saga its way back, from
its state, or pages when it cannot.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from sagaq.kinds import Action, Kind
from sagaq.machine import FINISHED, SagaState, StepStatus
from sagaq.store.db import Database, Lost
from sagaq.store.dispatch import advance_rollback
from sagaq.store.faults import Write
from sagaq.store.lifecycle import NOTIFY_TASK, notify, outbox, transition
from sagaq.store.models import APPROVALS, NOTIFICATIONS, OUTBOX, RUNS, SAGAS
from sagaq.store.records import Dispatch, SagaRecord, Stranded
from sagaq.store.timeline import Timeline

S = SagaState
_UNRESOLVED = sa.and_(RUNS.c.status == StepStatus.UNKNOWN.value, RUNS.c.finished_at.is_(None))


def _in_flight(n: Any) -> Any:
    """A notification that was sent, or will be: pending or sending, with its message."""
    return sa.or_(
        n.c.status == "sent",
        sa.and_(n.c.status.in_(["pending", "sending"]),
                sa.exists().where(OUTBOX.c.notification_id == n.c.id)),
    )


def ways_forward() -> Any:
    """True for a saga row (``SAGAS``) that has a way forward."""
    attempt = sa.exists().where(
        RUNS.c.saga_id == SAGAS.c.id,
        sa.or_(RUNS.c.status == StepStatus.RUNNING.value, _UNRESOLVED),
    )
    scheduled = sa.exists().where(
        RUNS.c.saga_id == SAGAS.c.id,
        RUNS.c.status == StepStatus.SCHEDULED.value,
        OUTBOX.c.step_run_id == RUNS.c.id,
    )
    held = SAGAS.c.state.in_([S.WAITING.value, S.AWAITING_APPROVAL.value])
    published = sa.or_(
        sa.and_(~held, scheduled),
        sa.and_(SAGAS.c.state == S.WAITING.value, SAGAS.c.wake_at.is_not(None), scheduled),
    )
    request = NOTIFICATIONS.alias("request")
    asked = sa.and_(
        SAGAS.c.state == S.AWAITING_APPROVAL.value,
        sa.exists().where(
            APPROVALS.c.saga_id == SAGAS.c.id,
            APPROVALS.c.status == "pending",
            sa.exists().where(RUNS.c.id == APPROVALS.c.step_run_id,
                              RUNS.c.status == StepStatus.SCHEDULED.value),
            sa.exists().where(request.c.saga_id == SAGAS.c.id,
                              request.c.subject == sa.literal("approval:") + APPROVALS.c.id,
                              request.c.action == Action.TRIGGER.value,
                              _in_flight(request)),
        ),
    )
    page = NOTIFICATIONS.alias("page")
    this_incident = sa.and_(page.c.saga_id == SAGAS.c.id, page.c.incident == SAGAS.c.incident,
                            page.c.kind == Kind.PAGE.value, page.c.action == Action.TRIGGER.value)
    paged = sa.and_(
        SAGAS.c.state == S.NEEDS_HUMAN.value,
        sa.exists().where(this_incident),
        ~sa.exists().where(this_incident, ~_in_flight(page)),
    )
    return sa.or_(attempt, published, asked, paged)


def _reason(state: SagaState, facts: dict[str, Any]) -> str:
    if state is S.NEEDS_HUMAN:
        if facts["failed_pages"]:
            return f"its page was not delivered ({facts['failed_pages']}); it stays listed"
        return "needs a human, but no page of this incident is sent or on its way"
    if state is S.AWAITING_APPROVAL:
        return "waits for an approval whose request was never sent (or no request is pending)"
    if state is S.WAITING:
        return "waits in Postgres, but has no wake time or no message to publish"
    if facts["scheduled"]:
        return "a step run is scheduled, but its message is lost (no outbox row)"
    if state is S.COMPENSATING:
        return "rolling back, but no compensation is scheduled or running"
    return f"{state.value}, but no step is scheduled or running"



def stranded(db: Database, limit: int = 100, saga_id: str | None = None) -> list[Stranded]:
    """Sagas that are not finished and have no way forward, oldest change first."""
    query = (
        sa.select(SAGAS.c.id, SAGAS.c.name, SAGAS.c.state, SAGAS.c.updated_at)
        .where(SAGAS.c.state.not_in([s.value for s in FINISHED]), ~ways_forward())
        .order_by(SAGAS.c.updated_at)
        .limit(limit)
    )
    if saga_id is not None:
        query = query.where(SAGAS.c.id == saga_id)
    out = []
    with db.read() as conn:
        for row in conn.execute(query).all():
            facts = {
                "failed_pages": ", ".join(conn.execute(
                    sa.select(NOTIFICATIONS.c.channel).where(
                        NOTIFICATIONS.c.saga_id == row.id,
                        NOTIFICATIONS.c.kind == Kind.PAGE.value,
                        NOTIFICATIONS.c.status == "failed")).scalars()),
                "scheduled": conn.execute(sa.select(RUNS.c.id).where(
                    RUNS.c.saga_id == row.id,
                    RUNS.c.status == StepStatus.SCHEDULED.value)).first() is not None,
            }
            state = SagaState(row.state)
            out.append(Stranded(row.id, row.name, state, _reason(state, facts),
                                row.updated_at))
    return out


def repair(db: Database, batch: int = 100) -> list[Dispatch]:
    """Give each stranded saga its way back, derived from its state; page when none is.

    Pages that failed for good (a 4xx) are not sent again and again: they stay listed.
    """
    out: list[Dispatch] = []
    for found in stranded(db, batch):
        outcome = db.on_saga(Write.REPAIR, found.saga_id,
                                lambda conn, saga, tl: _repair(db, conn, saga, tl),
                                worker="reconciler")
        out += outcome.dispatches
    return out


def _repair(db: Database, conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
    still = conn.execute(
        sa.select(SAGAS.c.id).where(SAGAS.c.id == saga.id, ~ways_forward())
    ).first()
    if still is None or saga.state in FINISHED:
        raise Lost("it found its way meanwhile")
    out: list[Dispatch] = []
    lost = conn.execute(
        sa.select(RUNS).where(
            RUNS.c.saga_id == saga.id, RUNS.c.status == StepStatus.SCHEDULED.value,
            ~sa.exists().where(OUTBOX.c.step_run_id == RUNS.c.id),
        )
    ).all()
    for run in lost:  # a scheduled run whose message is gone: write it again
        out.append(outbox(conn, saga.id, run.task_name, run.id, tl.now,
                                ref="step_run_id"))
    if saga.state is S.WAITING and saga.wake_at is None:
        conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga.id)
                     .values(wake_at=tl.now))
    if lost or saga.state is S.WAITING:
        tl.add("saga.repaired", message=f"{len(lost)} lost message(s) written again")
        return [] if saga.state is S.WAITING else out
    if saga.state is S.COMPENSATING:
        tl.add("saga.repaired", message="the rollback goes on with its next compensation")
        return advance_rollback(db, conn, saga, tl)
    if saga.state is S.NEEDS_HUMAN:
        tl.add("saga.repaired", message="the page of this incident is queued again")
        return _requeue(db, conn, saga, tl, Kind.PAGE, "") or notify(
            db, conn, saga, Kind.PAGE, Action.TRIGGER, tl)
    if saga.state is S.AWAITING_APPROVAL:
        pending = conn.execute(
            sa.select(APPROVALS.c.id).where(APPROVALS.c.saga_id == saga.id,
                                            APPROVALS.c.status == "pending")
        ).scalars().all()
        if pending:
            tl.add("saga.repaired", message="the approval request is sent again")
            subject = f"approval:{pending[0]}"
            return _requeue(db, conn, saga, tl, Kind.NOTIFY, subject) or notify(
                db, conn, saga, Kind.NOTIFY, Action.TRIGGER, tl,
                note=f"approval {pending[0]} needed; `sagaq approve {pending[0]} --by NAME`",
                subject=subject)
    why = "no way forward: " + _reason(saga.state, {"failed_pages": "", "scheduled": False})
    tl.add("ladder.rung", message=f"rung 4: page: {why}",
           data={"level": 4, "applicable": True, "action": "page", "reason": why,
                 "direction": "forward"})
    return transition(db, conn, saga, "escalate", tl, error=why)[1]


def _requeue(db: Database, conn: sa.Connection, saga: SagaRecord, tl: Timeline, kind: Kind,
             subject: str) -> list[Dispatch]:
    """Pending notices of this incident that lost their message get one again."""
    rows = conn.execute(
        sa.select(NOTIFICATIONS.c.id).where(
            NOTIFICATIONS.c.saga_id == saga.id, NOTIFICATIONS.c.incident == saga.incident,
            NOTIFICATIONS.c.kind == kind.value, NOTIFICATIONS.c.subject == subject,
            NOTIFICATIONS.c.action == Action.TRIGGER.value,
            NOTIFICATIONS.c.status.in_(["pending", "sending"]),
            ~sa.exists().where(OUTBOX.c.notification_id == NOTIFICATIONS.c.id),
        )
    ).scalars().all()
    return [outbox(conn, saga.id, NOTIFY_TASK, n, tl.now, ref="notification_id")
            for n in rows]
