"""The store: the few transactional operations the engine needs. All SQL lives here.

Every state change is a guarded UPDATE (``WHERE state = :expected`` / ``status = :expected``)
that reports whether it won; a loser rolls its whole transaction back and returns
``Outcome(won=False)``. Each operation that changes what should run next writes the step run
and its outbox row in the same transaction and returns the :class:`Dispatch` to publish after
the commit. Operations lock the saga row first, so two writers on one saga serialize.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from sagaq.errors import UnknownSagaError
from sagaq.keys import idempotency_key
from sagaq.ladder import Then
from sagaq.machine import Direction, SagaState, StepStatus, next_state
from sagaq.store.models import OUTBOX, RUNS, SAGAS, SagaModel
from sagaq.store.records import (
    Claim,
    ClaimStatus,
    Dispatch,
    NewRun,
    Outcome,
    SagaRecord,
)
from sagaq.store.timeline import Timeline, saga_record, step_run_record
from sagaq.store.views import Views

T = TypeVar("T")

_FINAL_RUN = {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.UNKNOWN}


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Lost(Exception):
    """A guard did not match: roll the transaction back and report ``won=False``."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


class Store(Views):
    """Named operations over the sagaq tables (reads come from :class:`Views`)."""

    def __init__(self, engine: sa.Engine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def dispose(self, *, close: bool = True) -> None:
        """Forget pooled connections; ``close=False`` after a fork (the parent owns them)."""
        self.engine.dispose(close=close)

    # -- transactions -------------------------------------------------------------------

    @contextmanager
    def _tx(self, session: Session | None = None) -> Iterator[sa.Connection]:
        if session is not None:
            yield session.connection()  # the caller commits, or not
            return
        with self.engine.begin() as conn:
            yield conn

    def _retrying(self, op: Callable[[], T], attempts: int = 4) -> T:
        """Run ``op`` again after a deadlock, a serialization failure or a dropped connection.

        Every operation is one transaction of guarded writes, so running it again is safe: if
        the first try did commit, the guards make the second a no-op that reports it lost.
        """
        for attempt in range(1, attempts + 1):
            try:
                return op()
            except sa.exc.DBAPIError as exc:
                code = getattr(exc.orig, "sqlstate", None)
                again = (
                    exc.connection_invalidated
                    or code in ("40P01", "40001")
                    or "database is locked" in str(exc.orig)
                )
                if attempt == attempts or not again:
                    raise
                time.sleep(0.01 * 2**attempt)
        raise AssertionError("unreachable")

    def _insert(self, conn: sa.Connection) -> Any:
        return postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert

    # -- writes -------------------------------------------------------------------------

    def create_saga(
        self,
        *,
        saga_id: str,
        name: str,
        version: str,
        input: Any,
        key: str | None,
        first: NewRun,
        session: Session | None = None,
    ) -> tuple[str, bool, list[Dispatch]]:
        """Write the saga, its first step run, its first events and the outbox row."""
        now = self.clock()
        with self._tx(session) as conn:
            stmt = self._insert(conn)(SagaModel).values(
                id=saga_id,
                name=name,
                version=version,
                state=SagaState.PENDING.value,
                key=key,
                input=input,
                checkpoint={"results": {}, "data": {}},
                created_at=now,
                updated_at=now,
            )
            if key is not None:
                stmt = stmt.on_conflict_do_nothing(index_elements=["name", "key"])
            if conn.execute(stmt.returning(SAGAS.c.id)).scalar() is None:
                existing = conn.execute(
                    sa.select(SAGAS.c.id).where(SAGAS.c.name == name, SAGAS.c.key == key)
                ).scalar_one()
                return existing, False, []
            tl = Timeline(saga_id, now)
            tl.add("saga.enqueued", message=f"{name} enqueued",
                   data={"version": version, "key": key})
            dispatch = self._schedule(conn, saga_id, first, now, tl)
            tl.flush(conn)
        return saga_id, True, [dispatch]

    def claim(
        self, saga_id: str, run_id: int, *, worker: str, task_id: str | None, lease: float
    ) -> Claim:
        """Mark a scheduled run RUNNING under a lease, and commit, before the action runs."""
        return self._retrying(lambda: self._claim(saga_id, run_id, worker, task_id, lease))

    def _claim(
        self, saga_id: str, run_id: int, worker: str, task_id: str | None, lease: float
    ) -> Claim:
        now = self.clock()
        with self._tx() as conn:
            tl = Timeline(saga_id, now, worker=worker, task_id=task_id)
            row = conn.execute(
                sa.update(RUNS)
                .where(
                    RUNS.c.id == run_id,
                    RUNS.c.saga_id == saga_id,
                    RUNS.c.status == StepStatus.SCHEDULED.value,
                )
                .values(
                    status=StepStatus.RUNNING.value,
                    worker=worker,
                    task_id=task_id,
                    started_at=now,
                    lease_expires_at=now + timedelta(seconds=lease),
                    deliveries=RUNS.c.deliveries + 1,
                )
                .returning(*RUNS.c)
            ).first()
            if row is None:
                return self._not_claimed(conn, saga_id, run_id, now, tl)
            run = step_run_record(row)
            conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.step_run_id == run_id))
            saga = saga_record(conn.execute(sa.select(SAGAS).where(SAGAS.c.id == saga_id)).one())
            if saga.state is SagaState.PENDING:
                self._transition(conn, saga.id, saga.name, saga.state, "start", tl)
                saga = _with_state(saga, SagaState.RUNNING)
            forward_result = None
            if run.direction is Direction.COMPENSATE:
                forward_result = conn.execute(
                    sa.select(RUNS.c.result)
                    .where(
                        RUNS.c.saga_id == saga_id,
                        RUNS.c.step == run.step,
                        RUNS.c.direction == Direction.FORWARD.value,
                        RUNS.c.status.in_([StepStatus.SUCCEEDED.value, StepStatus.UNKNOWN.value]),
                    )
                    .order_by(RUNS.c.id.desc())
                    .limit(1)
                ).scalar()
            tl.run_event(run, "claimed", f"attempt {run.attempt}, delivery {run.deliveries}")
            tl.flush(conn)
        return Claim(ClaimStatus.CLAIMED, run, saga, forward_result)

    def _not_claimed(
        self, conn: sa.Connection, saga_id: str, run_id: int, now: datetime, tl: Timeline
    ) -> Claim:
        row = conn.execute(
            sa.select(RUNS).where(RUNS.c.id == run_id, RUNS.c.saga_id == saga_id)
        ).first()
        if row is None:
            return Claim(ClaimStatus.MISSING)
        run = step_run_record(row)
        if run.status in _FINAL_RUN:
            status, why = ClaimStatus.FINISHED, f"run already {run.status.value}"
        elif run.lease_expires_at is not None and run.lease_expires_at <= now:
            return Claim(ClaimStatus.EXPIRED, run)
        else:
            status, why = ClaimStatus.BUSY, f"running on {run.worker} under a live lease"
        tl.run_event(run, "dropped", f"duplicate delivery dropped: {why}")
        tl.flush(conn)
        return Claim(status, run)

    def expire(self, saga_id: str, run_id: int, *, worker: str) -> bool:
        """RUNNING with an expired lease → UNKNOWN. True if this caller made the change."""
        now = self.clock()
        with self._tx() as conn:
            row = conn.execute(
                sa.update(RUNS)
                .where(
                    RUNS.c.id == run_id,
                    RUNS.c.saga_id == saga_id,
                    RUNS.c.status == StepStatus.RUNNING.value,
                    RUNS.c.lease_expires_at <= now,
                )
                .values(status=StepStatus.UNKNOWN.value, lease_expires_at=None)
                .returning(*RUNS.c)
            ).first()
            if row is None:
                return False
            tl = Timeline(saga_id, now, worker=worker)
            run = step_run_record(row)
            tl.run_event(run, "outcome_unknown", f"lease held by {run.worker} expired")
            tl.flush(conn)
        return True

    def succeed(
        self,
        saga_id: str,
        run_id: int,
        *,
        result: Any,
        checkpoint: dict[str, Any] | None,
        next_run: NewRun | None,
        worker: str | None,
        task_id: str | None,
        expected: StepStatus = StepStatus.RUNNING,
        message: str = "",
    ) -> Outcome:
        """Record a run's result, the checkpoint, and what comes next, in one transaction."""

        def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
            if checkpoint is not None:
                conn.execute(
                    sa.update(SAGAS).where(SAGAS.c.id == saga_id).values(checkpoint=checkpoint)
                )
            run = self._finish_run(conn, run_id, expected, StepStatus.SUCCEEDED, tl, message,
                                   result=result)
            if saga.state is SagaState.COMPENSATING:
                return self._advance_rollback(conn, saga, tl)
            if saga.state is not SagaState.RUNNING or run.direction is not Direction.FORWARD:
                return []
            if next_run is not None:
                return [self._schedule(conn, saga_id, next_run, tl.now, tl)]
            self._transition(conn, saga.id, saga.name, saga.state, "finish", tl, finished=True)
            return []

        return self._on_saga(saga_id, op, worker, task_id)

    def fail(
        self,
        saga_id: str,
        run_id: int,
        *,
        error: str,
        error_type: str,
        then: Then,
        retry: NewRun | None = None,
        worker: str | None,
        task_id: str | None,
        expected: StepStatus = StepStatus.RUNNING,
        status: StepStatus = StepStatus.FAILED,
        data: dict[str, Any] | None = None,
    ) -> Outcome:
        """Record a failed run and apply the engine's decision: retry, roll back or escalate."""

        def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
            run = self._finish_run(conn, run_id, expected, status, tl, error,
                                   error=error, error_type=error_type,
                                   data={"then": then.value, **(data or {})})
            forward = run.direction is Direction.FORWARD
            if saga.state is SagaState.COMPENSATING and forward:
                return self._advance_rollback(conn, saga, tl)  # rolled back meanwhile
            live = SagaState.RUNNING if forward else SagaState.COMPENSATING
            if saga.state is not live:
                return []
            if then is Then.RETRY and retry is not None:
                return [self._schedule(conn, saga_id, retry, tl.now, tl)]
            if then is Then.ROLLBACK and forward:
                return self._start_rollback(conn, saga, tl, f"{run.step} failed: {error}")
            self._transition(conn, saga.id, saga.name, saga.state, "escalate", tl,
                             error=f"{run.step} ({run.direction.value}) failed: {error}")
            return []

        return self._on_saga(saga_id, op, worker, task_id)

    # -- building blocks ----------------------------------------------------------------

    def _on_saga(
        self,
        saga_id: str,
        op: Callable[[sa.Connection, SagaRecord, Timeline], list[Dispatch]],
        worker: str | None,
        task_id: str | None,
    ) -> Outcome:
        def attempt() -> Outcome:
            now = self.clock()
            try:
                with self._tx() as conn:
                    # Lock the saga row first: every writer on one saga takes this lock first.
                    row = conn.execute(
                        sa.update(SAGAS)
                        .where(SAGAS.c.id == saga_id)
                        .values(updated_at=now)
                        .returning(*SAGAS.c)
                    ).first()
                    if row is None:
                        raise _Lost(f"saga {saga_id} does not exist")
                    tl = Timeline(saga_id, now, worker=worker, task_id=task_id)
                    saga = saga_record(row)
                    dispatches = op(conn, saga, tl)
                    tl.flush(conn)
            except _Lost as lost:
                return Outcome(False, note=lost.note)
            return Outcome(True, tl.entered or saga.state, dispatches, entered=tl.entered)

        return self._retrying(attempt)

    def _finish_run(
        self,
        conn: sa.Connection,
        run_id: int,
        expected: StepStatus,
        status: StepStatus,
        tl: Timeline,
        message: str,
        *,
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> Any:
        row = conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.status == expected.value)
            .values(status=status.value, finished_at=tl.now, lease_expires_at=None, **values)
            .returning(*RUNS.c)
        ).first()
        if row is None:
            raise _Lost(f"run {run_id} is no longer {expected.value}")
        run = step_run_record(row)
        tl.run_event(run, status.value, message, data)
        return run

    def _schedule(
        self, conn: sa.Connection, saga_id: str, new: NewRun, now: datetime, tl: Timeline
    ) -> Dispatch:
        message_id = str(uuid.uuid4())
        not_before = now + timedelta(seconds=new.delay) if new.delay > 0 else None
        run_id = conn.execute(
            sa.insert(RUNS)
            .values(
                saga_id=saga_id,
                step=new.step,
                step_index=new.step_index,
                direction=new.direction.value,
                attempt=new.attempt,
                status=StepStatus.SCHEDULED.value,
                task_name=new.task_name,
                compensate_task=new.compensate_task,
                idempotency_key=new.idempotency_key,
                message_id=message_id,
                deliveries=0,
                not_before=not_before,
                scheduled_at=now,
            )
            .returning(RUNS.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(OUTBOX).values(
                saga_id=saga_id,
                step_run_id=run_id,
                task_name=new.task_name,
                args=[saga_id, run_id],
                message_id=message_id,
                available_at=not_before or now,
                created_at=now,
            )
        )
        detail = new.reason or f"attempt {new.attempt}"
        if new.delay > 0:
            detail += f", in {new.delay:.2f}s"
        tl.add(f"{_prefix(new.direction)}.scheduled", step=new.step, run_id=run_id,
               message=detail, data={"attempt": new.attempt, "delay": new.delay})
        return Dispatch(new.task_name, (saga_id, run_id), message_id, new.delay)

    def _transition(
        self,
        conn: sa.Connection,
        saga_id: str,
        name: str,
        current: SagaState,
        trigger: str,
        tl: Timeline,
        *,
        error: str | None = None,
        finished: bool = False,
    ) -> SagaState:
        new = next_state(name, current, trigger, saga_id=saga_id)
        values: dict[str, Any] = {"state": new.value, "updated_at": tl.now}
        if error is not None:
            values["error"] = error
        if finished:
            values["finished_at"] = tl.now
        done = conn.execute(
            sa.update(SAGAS)
            .where(SAGAS.c.id == saga_id, SAGAS.c.state == current.value)
            .values(**values)
        )
        if done.rowcount != 1:
            raise _Lost(f"saga {saga_id} left {current.value} meanwhile")
        tl.entered = new
        tl.add(f"saga.{new.value}", message=error or f"{current.value} → {new.value}",
               data={"from": current.value, "to": new.value, "trigger": trigger})
        return new

    def _start_rollback(
        self, conn: sa.Connection, saga: SagaRecord, tl: Timeline, reason: str
    ) -> list[Dispatch]:
        self._transition(conn, saga.id, saga.name, saga.state, "rollback", tl, error=reason)
        skipped = conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.saga_id == saga.id, RUNS.c.status == StepStatus.SCHEDULED.value)
            .values(status=StepStatus.SKIPPED.value, finished_at=tl.now)
            .returning(RUNS.c.id)
        ).scalars().all()
        if skipped:
            conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.step_run_id.in_(skipped)))
        done = conn.execute(
            sa.select(RUNS.c.step, RUNS.c.compensate_task)
            .where(
                RUNS.c.saga_id == saga.id,
                RUNS.c.direction == Direction.FORWARD.value,
                RUNS.c.status.in_([StepStatus.SUCCEEDED.value, StepStatus.UNKNOWN.value]),
            )
            .order_by(RUNS.c.step_index.desc(), RUNS.c.id.desc())
        ).all()
        plan = list(dict.fromkeys(step for step, task in done if task))
        bare = list(dict.fromkeys(step for step, task in done if not task))
        tl.add("rollback.plan", message="compensate " + (" → ".join(plan) or "nothing"),
               data={"compensate": plan, "no_compensation": bare, "mode": "lifo_stack"})
        return self._advance_rollback(conn, _with_state(saga, SagaState.COMPENSATING), tl)

    def _advance_rollback(
        self, conn: sa.Connection, saga: SagaRecord, tl: Timeline
    ) -> list[Dispatch]:
        """Schedule the next compensation (LIFO), or finish the rollback when none is left."""
        busy = conn.execute(
            sa.select(RUNS.c.id).where(
                RUNS.c.saga_id == saga.id,
                RUNS.c.status.in_([StepStatus.SCHEDULED.value, StepStatus.RUNNING.value]),
            )
        ).first()
        if busy is not None:
            return []  # the active run's own completion advances the rollback
        comp = RUNS.alias("comp")
        undone = sa.exists().where(
            comp.c.saga_id == saga.id,
            comp.c.direction == Direction.COMPENSATE.value,
            comp.c.step == RUNS.c.step,
            comp.c.status == StepStatus.SUCCEEDED.value,
        )
        nxt = conn.execute(
            sa.select(RUNS.c.step, RUNS.c.step_index, RUNS.c.compensate_task)
            .where(
                RUNS.c.saga_id == saga.id,
                RUNS.c.direction == Direction.FORWARD.value,
                RUNS.c.status.in_([StepStatus.SUCCEEDED.value, StepStatus.UNKNOWN.value]),
                RUNS.c.compensate_task.is_not(None),
                ~undone,
            )
            .order_by(RUNS.c.step_index.desc())
            .limit(1)
        ).first()
        if nxt is None:
            self._transition(conn, saga.id, saga.name, saga.state, "finish_rollback", tl,
                             finished=True)
            return []
        new = NewRun(
            step=nxt.step,
            step_index=nxt.step_index,
            direction=Direction.COMPENSATE,
            attempt=1,
            task_name=nxt.compensate_task,
            idempotency_key=idempotency_key(saga.id, nxt.step, Direction.COMPENSATE),
            reason="undo (last done, first undone)",
        )
        return [self._schedule(conn, saga.id, new, tl.now, tl)]

    def get_saga_or_raise(self, saga_id: str) -> SagaRecord:
        saga = self.get_saga(saga_id)
        if saga is None:
            raise UnknownSagaError(f"no saga with id {saga_id!r}", saga_id=saga_id)
        return saga


def _prefix(direction: Direction) -> str:
    return "step" if direction is Direction.FORWARD else "compensation"


def _with_state(saga: SagaRecord, state: SagaState) -> SagaRecord:
    from dataclasses import replace

    return replace(saga, state=state)
