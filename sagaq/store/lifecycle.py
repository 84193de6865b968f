"""Lifecycle moves of a saga, and the messages they imply: notices and outbox rows.

Every function here runs inside a write that already holds the saga row's lock
(:meth:`Database.on_saga`); a guard that does not hold raises :class:`Lost`.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from sagaq.kinds import Action, Kind
from sagaq.machine import SagaState, next_state
from sagaq.store.db import Database, Lost
from sagaq.store.models import NOTIFICATIONS, OUTBOX, RESOURCES, SAGAS
from sagaq.store.records import Dispatch, SagaRecord
from sagaq.store.timeline import Timeline

NOTIFY_TASK = "sagaq.notify"
RELEASE_TASK = "sagaq.release"


def transition(
    db: Database,
    conn: sa.Connection,
    saga: SagaRecord,
    trigger: str,
    tl: Timeline,
    *,
    error: str | None = None,
    finished: bool = False,
    wake_at: datetime | None = None,
    data: dict[str, Any] | None = None,
) -> tuple[SagaRecord, list[Dispatch]]:
    """Move the saga (guarded on its current state); entering needs_human pages."""
    new = next_state(saga.name, saga.state, trigger, saga_id=saga.id)
    values: dict[str, Any] = {"state": new.value, "updated_at": tl.now, "wake_at": wake_at}
    if error is not None:
        values["error"] = error
    if finished:
        values["finished_at"] = tl.now
    incident = saga.incident
    if new is SagaState.NEEDS_HUMAN:
        incident += 1
        values["incident"] = incident
    done = conn.execute(
        sa.update(SAGAS)
        .where(SAGAS.c.id == saga.id, SAGAS.c.state == saga.state.value)
        .values(**values)
    )
    if done.rowcount != 1:
        raise Lost(f"saga {saga.id} left {saga.state.value} meanwhile")
    tl.entered = new
    tl.add(f"saga.{new.value}", message=error or f"{saga.state.value} → {new.value}",
           data={"from": saga.state.value, "to": new.value, "trigger": trigger, **(data or {})})
    moved = replace(saga, state=new, incident=incident, wake_at=wake_at,
                    error=error if error is not None else saga.error)
    dispatches: list[Dispatch] = []
    if new is SagaState.NEEDS_HUMAN:
        dispatches = notify(db, conn, moved, Kind.PAGE, Action.TRIGGER, tl)
    if new is SagaState.COMPENSATED:
        # Whatever its steps registered and no compensation undid is now an orphan.
        conn.execute(
            sa.update(RESOURCES)
            .where(RESOURCES.c.saga_id == saga.id, RESOURCES.c.status == "held")
            .values(status="orphaned", updated_at=tl.now)
        )
    return moved, dispatches


def notify(
    db: Database,
    conn: sa.Connection,
    saga: SagaRecord,
    kind: Kind,
    action: Action,
    tl: Timeline,
    note: str | None = None,
    subject: str = "",
) -> list[Dispatch]:
    """One notification per channel for this incident, each with its outbox row."""
    dispatches = []
    for channel in db.channels.get(kind, ()):
        values = {
            "saga_id": saga.id,
            "incident": saga.incident,
            "channel": channel,
            "kind": kind.value,
            "action": action.value,
            "dedup_key": dedup_key(saga.id, saga.incident),
            "status": "pending",
            "attempts": 0,
            "note": note,
            "subject": subject,
            "created_at": tl.now,
            "updated_at": tl.now,
        }
        stmt = insert(NOTIFICATIONS).values(**values).on_conflict_do_nothing()
        notification_id = conn.execute(stmt.returning(NOTIFICATIONS.c.id)).scalar()
        if notification_id is None:
            continue  # this incident already has it: one incident, one page
        dispatches.append(outbox(conn, saga.id, NOTIFY_TASK, notification_id, tl.now,
                                 ref="notification_id"))
        tl.add(f"{kind.value}.queued", message=f"{action.value} via {channel}",
               data={"channel": channel, "incident": saga.incident, "action": action.value})
    return dispatches


def outbox(
    conn: sa.Connection,
    saga_id: str,
    task_name: str,
    ref_id: int,
    available_at: datetime,
    *,
    ref: str,
    countdown: float = 0.0,
    created_at: datetime | None = None,
) -> Dispatch:
    """An outbox row for a message about one step run, notification or resource, due at
    ``available_at`` (written at ``created_at``, by default the same moment)."""
    message_id = str(uuid.uuid4())
    conn.execute(
        sa.insert(OUTBOX).values(
            saga_id=saga_id,
            **{ref: ref_id},
            task_name=task_name,
            args=[saga_id, ref_id],
            message_id=message_id,
            available_at=available_at,
            created_at=created_at or available_at,
        )
    )
    return Dispatch(task_name, (saga_id, ref_id), message_id, countdown)


def rung_text(rung: Any) -> str:
    """One ladder rung as the timeline says it ("rung 1: not applicable: why")."""
    if rung.applicable or rung.action == "not applicable":
        return f"rung {rung.level}: {rung.action}: {rung.reason}"
    return f"rung {rung.level}: {rung.action} (not applicable): {rung.reason}"


def add_rung(tl: Timeline, rung: Any, direction: str, *, step: str | None = None,
             run_id: int | None = None) -> None:
    """A ladder rung on the timeline: its text and its data, built here only."""
    tl.add("ladder.rung", step=step, run_id=run_id, message=rung_text(rung),
           data={"level": rung.level, "applicable": rung.applicable, "action": rung.action,
                 "reason": rung.reason, "direction": direction})


def dedup_key(saga_id: str, incident: int) -> str:
    """Stable per incident: every redelivery and every channel says the same key."""
    return f"sagaq/{saga_id}/incident-{incident}"
