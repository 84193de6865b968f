"""Delivering notifications: claim one, record how it went. Retries go back to the outbox."""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from sagaq.store.db import Database
from sagaq.store.faults import Write
from sagaq.store.lifecycle import NOTIFY_TASK, outbox
from sagaq.store.models import NOTIFICATIONS, OUTBOX
from sagaq.store.records import Dispatch, NotificationRecord
from sagaq.store.timeline import Timeline, notification_record

SENDING_LEASE = timedelta(seconds=60)  # a sender that died mid-send is retried after this



def notification(db: Database, notification_id: int) -> NotificationRecord | None:
    with db.read() as conn:
        row = conn.execute(
            sa.select(NOTIFICATIONS).where(NOTIFICATIONS.c.id == notification_id)
        ).first()
    return notification_record(row) if row is not None else None


def notifications(db: Database, saga_id: str) -> list[NotificationRecord]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.saga_id == saga_id)
            .order_by(NOTIFICATIONS.c.id)
        )
        return [notification_record(r) for r in rows]


def begin_delivery(db: Database, notification_id: int) -> NotificationRecord | None:
    """pending → sending (or a stale sending one): None if another delivery has it."""
    now = db.clock()
    with db.write(Write.BEGIN_DELIVERY) as conn:
        row = conn.execute(
            sa.update(NOTIFICATIONS)
            .where(
                NOTIFICATIONS.c.id == notification_id,
                sa.or_(
                    NOTIFICATIONS.c.status == "pending",
                    sa.and_(
                        NOTIFICATIONS.c.status == "sending",
                        NOTIFICATIONS.c.updated_at < db.db_in(-SENDING_LEASE.total_seconds()),
                    ),
                ),
            )
            .values(status="sending", attempts=NOTIFICATIONS.c.attempts + 1, updated_at=now)
            .returning(*NOTIFICATIONS.c)
        ).first()
    return notification_record(row) if row is not None else None


def end_delivery(
    db: Database,
    notification: NotificationRecord,
    *,
    sent: bool,
    error: str | None = None,
    retry_in: float | None = None,
    durable: bool = False,
) -> list[Dispatch]:
    """sending → sent | failed, or back to pending with a new message in ``retry_in`` s.

    Fenced by the attempt: a sender whose delivery was taken over (it stalled past the
    sending lease) records nothing. A ``durable`` retry is not published with a countdown
    (Redis would redeliver a long one): its outbox row becomes due, and the reconciler
    publishes it then.
    """
    now = db.clock()
    n = notification
    with db.write(Write.END_DELIVERY) as conn:
        tl = Timeline(n.saga_id, now)
        if retry_in is not None:
            status, what = "pending", "retry"
        else:
            status, what = ("sent", "sent") if sent else ("failed", "failed")
        done = conn.execute(
            sa.update(NOTIFICATIONS)
            .where(NOTIFICATIONS.c.id == n.id, NOTIFICATIONS.c.status == "sending",
                   NOTIFICATIONS.c.attempts == n.attempts)
            .values(status=status, last_error=error, updated_at=now,
                    sent_at=now if sent else None)
        )
        if done.rowcount != 1:
            return []
        detail = f"{n.action} via {n.channel}, attempt {n.attempts}"
        if error:
            detail += f": {error}"
        if retry_in is not None:
            detail += f"; again in {retry_in:.1f}s"
        tl.add(f"{n.kind}.{what}", message=detail,
               data={"channel": n.channel, "incident": n.incident, "action": n.action,
                     "attempt": n.attempts})
        tl.flush(conn)
        row = conn.execute(
            sa.select(OUTBOX).where(OUTBOX.c.notification_id == n.id)
        ).first()
        if retry_in is None:
            conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.notification_id == n.id))
            return []
        due = now + timedelta(seconds=retry_in)
        if row is None:  # never leave a pending notice without its message
            again = outbox(conn, n.saga_id, NOTIFY_TASK, n.id, due,
                                 ref="notification_id", countdown=retry_in, created_at=now)
        else:
            conn.execute(
                sa.update(OUTBOX)
                .where(OUTBOX.c.id == row.id)
                .values(available_at=due, republished=0,
                        # published now with a countdown, or due for the reconciler
                        republished_at=None if durable else now)
            )
            again = Dispatch(row.task_name, (row.args[0], row.args[1]), row.message_id,
                             retry_in)
    return [] if durable else [again]
