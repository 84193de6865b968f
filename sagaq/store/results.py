"""Results: a run's outcome recorded, and what follows from it, in one transaction.

Forward steps, compensations and policy-gated dispatches take the same way: the saga row is
locked first (with the new checkpoint), the run's outcome is written under its guard (still
``running`` under this attempt's token, not yet resolved: a zombie loses), then the saga's
next move: the next step, the next compensation, a rollback, a retry, the end.
"""

from __future__ import annotations

import functools
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from sagaq.ladder import Rung, Then
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.store.advance import advance
from sagaq.store.db import Database, Lost
from sagaq.store.dispatch import advance_rollback, schedule, start_rollback
from sagaq.store.faults import Write
from sagaq.store.lifecycle import add_rung, transition
from sagaq.store.models import OUTBOX, RESOURCES, RUNS, Json, UTCDateTime
from sagaq.store.records import Dispatch, NewRun, Outcome, SagaRecord, StepRunRecord
from sagaq.store.sql import run_compiled
from sagaq.store.timeline import Timeline, step_run_record


@functools.cache
def _finish_run() -> Any:
    """The attempt's outcome, guarded, and its outbox rows gone (a recovery message the lease
    sweep wrote meanwhile goes with the attempt): one statement."""
    done = (
        sa.update(RUNS)
        .where(RUNS.c.id == sa.bindparam("run_id"), RUNS.c.status == sa.bindparam("expected"),
               RUNS.c.deliveries == sa.bindparam("token"), RUNS.c.finished_at.is_(None))
        .values(status=sa.bindparam("status"),
                finished_at=sa.cast(sa.bindparam("now", type_=UTCDateTime()), UTCDateTime()),
                lease_expires_at=None, result=sa.bindparam("result", type_=Json),
                error=sa.bindparam("error"), error_type=sa.bindparam("error_type"),
                failure=sa.bindparam("failure"))
        .returning(*RUNS.c)
        .cte("done")
    )
    gone = sa.delete(OUTBOX).where(OUTBOX.c.step_run_id.in_(sa.select(done.c.id))).cte("gone")
    return sa.select(sa.literal_column("*")).select_from(done).add_cte(gone)


def finish_run(
    conn: sa.Connection, run_id: int, token: int, expected: StepStatus, status: StepStatus,
    tl: Timeline, message: str, data: dict[str, Any] | None = None, *, result: Any = None,
    error: str | None = None, error_type: str | None = None, failure: str | None = None,
) -> StepRunRecord:
    """The attempt's outcome, guarded: the run still ``expected``, still this delivery's
    (a zombie, whose run was taken over, loses), and not yet resolved."""
    cur = run_compiled(conn, _finish_run, {
        "run_id": run_id, "expected": expected.value, "token": token, "status": status.value,
        "now": tl.now,
        "result": Jsonb(result) if status is StepStatus.SUCCEEDED else None,
        "error": error, "error_type": error_type, "failure": failure,
    })
    row = cur.fetchone()
    if row is None:
        raise Lost(f"run {run_id} is no longer {expected.value} under delivery {token}")
    run = step_run_record(dict(zip((d.name for d in cur.description), row, strict=True)))
    tl.run_event(run, status.value, message, data)
    return run


def succeed(
    db: Database,
    saga_id: str,
    run_id: int,
    *,
    token: int,
    result: Any,
    checkpoint: dict[str, Any] | None,
    next_run: NewRun | None,
    worker: str | None,
    task_id: str | None,
    expected: StepStatus = StepStatus.RUNNING,
    message: str = "",
    saga_name: str | None = None,
) -> Outcome:
    """Record a run's result, the checkpoint, and what comes next, in one transaction.

    A forward step's plain success while its saga runs (``saga_name`` given) is one
    statement (:mod:`sagaq.store.advance`); any other outcome is decided here.
    """
    if (saga_name is not None and checkpoint is not None and expected is StepStatus.RUNNING
            and not message):
        done = advance(db, saga_id, run_id, name=saga_name, token=token, result=result,
                       checkpoint=checkpoint, new=next_run, worker=worker, task_id=task_id)
        if done is not None:
            return done

    def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
        run = finish_run(conn, run_id, token, expected, StepStatus.SUCCEEDED, tl, message,
                         result=result)
        if run.direction is Direction.COMPENSATE:
            # The compensation undid what its step created.
            conn.execute(
                sa.update(RESOURCES)
                .where(RESOURCES.c.saga_id == saga_id, RESOURCES.c.step == run.step,
                       RESOURCES.c.status == "held")
                .values(status="released", released_at=tl.now, updated_at=tl.now)
            )
        if saga.state is SagaState.COMPENSATING:
            return advance_rollback(db, conn, saga, tl)
        if saga.state is not SagaState.RUNNING or run.direction is not Direction.FORWARD:
            return []
        if next_run is not None:
            return schedule(db, conn, saga, next_run, tl)[1]
        return transition(db, conn, saga, "finish", tl, finished=True)[1]

    extra = {"checkpoint": checkpoint} if checkpoint is not None else {}
    return db.on_saga(Write.SUCCEED, saga_id, op, worker, task_id, **extra)


def fail(
    db: Database,
    saga_id: str,
    run_id: int,
    *,
    token: int,
    error: str,
    error_type: str,
    failure: str,
    then: Then,
    rungs: tuple[Rung, ...] = (),
    retry: NewRun | None = None,
    checkpoint: dict[str, Any] | None = None,
    worker: str | None,
    task_id: str | None,
    expected: StepStatus = StepStatus.RUNNING,
    status: StepStatus = StepStatus.FAILED,
) -> Outcome:
    """Record a failed run, the ladder rungs it climbed, and apply the decision."""

    def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
        run = finish_run(conn, run_id, token, expected, status, tl, error,
                         {"then": then.value, "failure": failure},
                         error=error, error_type=error_type, failure=failure)
        for rung in rungs:
            add_rung(tl, rung, run.direction.value, step=run.step, run_id=run.id)
        forward = run.direction is Direction.FORWARD
        if saga.state is SagaState.COMPENSATING and forward:
            return advance_rollback(db, conn, saga, tl)  # rolled back meanwhile
        live = SagaState.RUNNING if forward else SagaState.COMPENSATING
        if saga.state is not live:
            return []
        if then is Then.RETRY and retry is not None:
            return schedule(db, conn, saga, retry, tl)[1]
        if then is Then.ROLLBACK and forward:
            return start_rollback(db, conn, saga, tl, f"{run.step} failed: {error}")
        return transition(db, conn, saga, "escalate", tl,
                          error=f"{run.step} ({run.direction.value}) failed: {error}")[1]

    # a refresh re-read the world into the checkpoint
    extra = {"checkpoint": checkpoint} if checkpoint is not None else {}
    return db.on_saga(Write.FAIL, saga_id, op, worker, task_id, **extra)
