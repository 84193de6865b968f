"""Starting a saga, and the operators' moves on one: retry and resolve."""

from __future__ import annotations

from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from sagaq.errors import UnknownSagaError
from sagaq.kinds import Action, Kind
from sagaq.machine import Direction, SagaState
from sagaq.store.advance import dispatchable, start
from sagaq.store.db import Database
from sagaq.store.dispatch import advance_rollback, schedule
from sagaq.store.faults import Write
from sagaq.store.lifecycle import notify, transition
from sagaq.store.models import EVENTS, RUNS, SAGAS
from sagaq.store.records import Dispatch, NewRun, Outcome, SagaRecord
from sagaq.store.timeline import Timeline, saga_record, step_run_record
from sagaq.store.views import get_saga


def create_saga(
    db: Database,
    *,
    saga_id: str,
    name: str,
    version: str,
    input: Any,
    key: str | None,
    first: NewRun,
    session: Session | None = None,
) -> tuple[str, bool, list[Dispatch]]:
    """Write the saga, its first step run (through the gate), its events and its message.

    A first step that goes out at once is one statement (:mod:`sagaq.store.advance`); one
    that waits (a delay, an approval) or is denied, and a key already taken, are decided here.

    On its own connection, a connection the server dropped is retried (nothing was sent
    on it); in the caller's transaction, the caller decides.
    """

    def attempt() -> tuple[str, bool, list[Dispatch]]:
        now = db.clock()
        tl = Timeline(saga_id, now)
        tl.add("saga.enqueued", message=f"{name} enqueued", data={"version": version, "key": key})
        if _on_psycopg(session) and dispatchable(db, name, saga_id, first, tl):
            with db.write(Write.ENQUEUE, session=session, autocommit=session is None) as conn:
                started = start(db, conn, saga_id=saga_id, name=name, version=version,
                                        input=input, key=key, first=first, tl=tl)
            if started is not None:
                return saga_id, True, started
            tl = Timeline(saga_id, now)  # the key is taken: below finds whose it is
        with db.write(Write.ENQUEUE, session=session) as conn:
            stmt = insert(SAGAS).values(
                id=saga_id, name=name, version=version, state=SagaState.PENDING.value,
                key=key, input=input, checkpoint={"results": {}, "data": {}},
                created_at=now, updated_at=now, incident=0,
            )
            if key is not None:
                stmt = stmt.on_conflict_do_nothing(index_elements=["name", "key"])
            row = conn.execute(stmt.returning(*SAGAS.c)).first()
            if row is None:
                existing = conn.execute(
                    sa.select(SAGAS.c.id).where(SAGAS.c.name == name, SAGAS.c.key == key)
                ).scalar_one()
                return existing, False, []
            tl = Timeline(saga_id, now)
            tl.add("saga.enqueued", message=f"{name} enqueued",
                   data={"version": version, "key": key})
            _, dispatches = schedule(db, conn, saga_record(row), first, tl)
            tl.flush(conn)
        return saga_id, True, dispatches

    return attempt() if session is not None else db.retrying(attempt)


def _on_psycopg(session: Session | None) -> bool:
    """The one-statement start runs on psycopg 3 (a caller's session may use another driver)."""
    if session is None:
        return True
    return isinstance(session.connection().connection.driver_connection, psycopg.Connection)


def retry(db: Database, saga_id: str, *, by: str, note: str | None = None) -> Outcome:
    """needs_human → run the rest again: the remaining compensations, or the failed step."""

    def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
        rolling_back = _escalated_from(conn, saga_id) == "compensating" or bool(
            conn.execute(
                sa.select(EVENTS.c.id).where(EVENTS.c.saga_id == saga_id,
                                             EVENTS.c.kind == "rollback.plan").limit(1)
            ).first()
        )
        trigger = "retry_rollback" if rolling_back else "retry_forward"
        tl.add("operator.retry", message=f"{by}: {note or 'retry'}",
               data={"by": by, "note": note})
        resolved = notify(db, conn, saga, Kind.PAGE, Action.RESOLVE, tl,
                          note=f"retried by {by}")
        saga, _ = transition(db, conn, saga, trigger, tl)
        if trigger == "retry_rollback":
            return resolved + advance_rollback(db, conn, saga, tl)
        last = conn.execute(
            sa.select(RUNS)
            .where(RUNS.c.saga_id == saga_id, RUNS.c.direction == Direction.FORWARD.value)
            .order_by(RUNS.c.id.desc())
            .limit(1)
        ).one()
        failed = step_run_record(last)
        again = NewRun(
            step=failed.step,
            step_index=failed.step_index,
            direction=Direction.FORWARD,
            attempt=1,
            task_name=failed.task_name,
            idempotency_key=failed.idempotency_key,
            compensate_task=failed.compensate_task,
            tier=None,
            # A denial of the retried step must page, not undo what came before the pivot.
            after_pivot=db.gate is not None and db.gate.after_pivot(saga.name, failed.step),
            reason=f"retried by {by}",
        )
        return resolved + schedule(db, conn, saga, again, tl)[1]

    return _operator(db, Write.RETRY, saga_id, op)


def resolve(db: Database, saga_id: str, *, by: str, note: str) -> Outcome:
    """needs_human → resolved: a human has put things right. Resolves the page."""

    def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
        tl.add("operator.resolve", message=f"{by}: {note}", data={"by": by, "note": note})
        resolved = notify(db, conn, saga, Kind.PAGE, Action.RESOLVE, tl,
                          note=f"resolved by {by}: {note}")
        return resolved + transition(db, conn, saga, "resolve", tl, finished=True)[1]

    return _operator(db, Write.RESOLVE, saga_id, op)


def _operator(db: Database, name: Write, saga_id: str, op: Any) -> Outcome:
    if get_saga(db, saga_id) is None:
        raise UnknownSagaError(f"no saga with id {saga_id!r}", saga_id=saga_id)
    return db.on_saga(name, saga_id, op, worker="operator")


def _escalated_from(conn: sa.Connection, saga_id: str) -> str | None:
    data = conn.execute(
        sa.select(EVENTS.c.data)
        .where(EVENTS.c.saga_id == saga_id, EVENTS.c.kind == "saga.needs_human")
        .order_by(EVENTS.c.id.desc())
        .limit(1)
    ).scalar()
    return (data or {}).get("from")
