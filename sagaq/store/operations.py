"""The store: the named operations the engine and the operators need. All SQL lives here.

One operation, one transaction. See :mod:`sagaq.store.base` for the rules every write
follows (guarded updates, the saga row locked first, outbox rows beside state changes).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from sagaq.errors import UnknownSagaError
from sagaq.ladder import Rung, Then
from sagaq.machine import Direction, SagaState, StepStatus, next_state
from sagaq.notify.base import Action, Kind
from sagaq.store import hotpath
from sagaq.store.approvals import Approvals
from sagaq.store.base import Lost, rung_text, uncompensated_query
from sagaq.store.faults import Write
from sagaq.store.liveness import Liveness
from sagaq.store.models import EVENTS, OUTBOX, RESOURCES, RUNS, SAGAS
from sagaq.store.notices import Notices
from sagaq.store.policies import Policies
from sagaq.store.records import (
    Claim,
    ClaimStatus,
    Dispatch,
    NewRun,
    Outcome,
    SagaRecord,
    StepRunRecord,
)
from sagaq.store.resources import Resources
from sagaq.store.sweeps import Sweeps
from sagaq.store.timeline import Timeline, saga_record, step_run_record
from sagaq.store.views import Views


class _Row:
    """A dict dressed as a row, for the record builders."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping


_FINAL_RUN = {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.UNKNOWN}


class Store(Approvals, Liveness, Notices, Policies, Resources, Sweeps, Views):
    """Named operations over the sagaq tables."""

    # -- starting -----------------------------------------------------------------------

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
        """Write the saga, its first step run, its first events and the outbox row.

        On its own connection, a connection the server dropped is retried (nothing was sent
        on it); in the caller's transaction, the caller decides.
        """
        if session is not None:
            return self._create_saga(saga_id, name, version, input, key, first, session)
        return self._retrying(
            lambda: self._create_saga(saga_id, name, version, input, key, first, None))

    def _create_saga(
        self, saga_id: str, name: str, version: str, input: Any, key: str | None,
        first: NewRun, session: Session | None,
    ) -> tuple[str, bool, list[Dispatch]]:
        now = self.clock()
        if self.fast and first.delay == 0 and (self.gate is None or not self.gate.active):
            # One statement: on a pooled autocommit connection, or inside the caller's
            # transaction when it runs on psycopg (it commits, or not).
            found: tuple[str, bool, list[Dispatch]] | None = None
            with self._write(Write.ENQUEUE, session=session, autocommit=session is None) as conn:
                if hotpath.usable(conn):
                    dispatch = hotpath.enqueue(conn, saga_id=saga_id, name=name,
                                               version=version, input=input, key=key,
                                               first=first, now=now)
                    if dispatch is not None:
                        found = saga_id, True, [dispatch]
                    else:
                        existing = conn.execute(
                            sa.select(SAGAS.c.id).where(SAGAS.c.name == name,
                                                        SAGAS.c.key == key)
                        ).scalar_one()
                        found = existing, False, []
            if found is not None:
                return found
        with self._tx(Write.ENQUEUE, session) as conn:
            stmt = self._insert(conn)(SAGAS).values(
                id=saga_id,
                name=name,
                version=version,
                state=SagaState.PENDING.value,
                key=key,
                input=input,
                checkpoint={"results": {}, "data": {}},
                created_at=now,
                updated_at=now,
                incident=0,
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
            _, dispatches = self._schedule(conn, saga_record(row), first, tl)
            tl.flush(conn)
        return saga_id, True, dispatches

    # -- running a step -----------------------------------------------------------------

    def claim(
        self, saga_id: str, run_id: int, *, worker: str, task_id: str | None, lease: float
    ) -> Claim:
        """Mark a scheduled run RUNNING under a lease, and commit, before the action runs."""
        if self.fast:
            found = self._retrying(lambda: self._claim_fast(saga_id, run_id, worker, task_id,
                                                            lease))
            if found is not None:
                return found
        return self._retrying(lambda: self._claim(saga_id, run_id, worker, task_id, lease))

    def _claim_fast(
        self, saga_id: str, run_id: int, worker: str, task_id: str | None, lease: float
    ) -> Claim | None:
        now = self.clock()
        with self._write(Write.CLAIM, autocommit=True) as conn:
            m = hotpath.claim(conn, saga_id, run_id, worker=worker, task_id=task_id,
                              lease=lease, now=now, clock=now if self.fixed_clock else None)
            if m is None:
                return None  # not claimable: the general path says why
            run = step_run_record(_Row({c.name: m[c.name] for c in RUNS.c}))
            saga = saga_record(_Row({c.name: m[f"saga__{c.name}"] for c in SAGAS.c}))
            if saga.state is SagaState.PENDING:
                saga = replace(saga, state=next_state(saga.name, saga.state, "start"))
            return self._claimed(conn, run, saga)

    def _claimed(self, conn: sa.Connection, run: StepRunRecord, saga: SagaRecord) -> Claim:
        """What a claimed run needs besides the rows: the result it undoes, earlier errors."""
        forward_result = None
        if run.direction is Direction.COMPENSATE:
            forward_result = conn.execute(
                sa.select(RUNS.c.result)
                .where(
                    RUNS.c.saga_id == saga.id,
                    RUNS.c.step == run.step,
                    RUNS.c.direction == Direction.FORWARD.value,
                    RUNS.c.status.in_([StepStatus.SUCCEEDED.value, StepStatus.UNKNOWN.value]),
                )
                .order_by(RUNS.c.id.desc())
                .limit(1)
            ).scalar()
        errors: tuple[str, ...] = ()
        if run.attempt > 1:
            errors = tuple(r.error for r in self._round(conn, run) if r.error)
        return Claim(ClaimStatus.CLAIMED, run, saga, forward_result, errors)

    def _claim(
        self, saga_id: str, run_id: int, worker: str, task_id: str | None, lease: float
    ) -> Claim:
        now = self.clock()
        with self._tx(Write.CLAIM) as conn:
            tl = Timeline(saga_id, now, worker=worker, task_id=task_id)
            row = conn.execute(
                sa.update(RUNS)
                .where(
                    RUNS.c.id == run_id,
                    RUNS.c.saga_id == saga_id,
                    RUNS.c.status == StepStatus.SCHEDULED.value,
                    ~self._held_back(saga_id),  # an early or duplicate message during a wait
                )
                .values(
                    status=StepStatus.RUNNING.value,
                    worker=worker,
                    task_id=task_id,
                    started_at=self.db_now(),
                    lease_expires_at=self.db_in(lease),
                    deliveries=RUNS.c.deliveries + 1,
                )
                .returning(*RUNS.c)
            ).first()
            if row is None:
                return self._not_claimed(conn, saga_id, run_id, tl)
            run = step_run_record(row)
            conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.step_run_id == run_id))
            saga = saga_record(conn.execute(sa.select(SAGAS).where(SAGAS.c.id == saga_id)).one())
            if saga.state is SagaState.PENDING:
                saga, _ = self._transition(conn, saga, "start", tl)
            tl.run_event(run, "claimed", f"attempt {run.attempt}, delivery {run.deliveries}",
                         {"level": run.level, "tier": run.tier})
            tl.flush(conn)
            return self._claimed(conn, run, saga)

    def _held_back(self, saga_id: str) -> Any:
        """The saga waits in Postgres (a durable backoff, an approval): no run may start."""
        return sa.exists().where(
            SAGAS.c.id == saga_id,
            sa.or_(
                SAGAS.c.state.in_([SagaState.WAITING.value, SagaState.AWAITING_APPROVAL.value]),
                SAGAS.c.wake_at > self.db_now(),  # a rollback waiting for a backoff
            ),
        )

    def _not_claimed(
        self, conn: sa.Connection, saga_id: str, run_id: int, tl: Timeline
    ) -> Claim:
        row = conn.execute(
            sa.select(RUNS, (RUNS.c.lease_expires_at <= self.db_now()).label("lapsed"))
            .where(RUNS.c.id == run_id, RUNS.c.saga_id == saga_id)
        ).first()
        if row is None:
            return Claim(ClaimStatus.MISSING)
        run = step_run_record(_Row({c.name: row._mapping[c.name] for c in RUNS.c}))
        unresolved = run.status is StepStatus.UNKNOWN and run.finished_at is None
        if run.status in _FINAL_RUN and not unresolved:
            status, why = ClaimStatus.FINISHED, f"run already {run.status.value}"
        elif run.status is StepStatus.SCHEDULED:
            status, why = ClaimStatus.EARLY, "the saga is waiting (a durable wait or an approval)"
        elif row.lapsed is True:
            return Claim(ClaimStatus.EXPIRED, run)  # its worker died, or a resolver did
        else:
            status, why = ClaimStatus.BUSY, f"running on {run.worker} under a live lease"
        tl.run_event(run, "dropped", f"duplicate delivery dropped: {why}")
        tl.flush(conn)
        return Claim(status, run)

    def round_of(self, run: StepRunRecord) -> list[StepRunRecord]:
        """The earlier runs of this step in this direction since its last first attempt."""
        with self.engine.connect() as conn:
            return self._round(conn, run)

    def _round(self, conn: sa.Connection, run: StepRunRecord) -> list[StepRunRecord]:
        if run.attempt <= 1:
            return []
        rows = conn.execute(
            sa.select(RUNS)
            .where(
                RUNS.c.saga_id == run.saga_id,
                RUNS.c.step == run.step,
                RUNS.c.direction == run.direction.value,
                RUNS.c.id < run.id,
            )
            .order_by(RUNS.c.id.desc())
            .limit(run.attempt - 1)
        )
        earlier = [step_run_record(r) for r in rows]
        earlier.reverse()
        return earlier

    def expire(
        self, saga_id: str, run_id: int, *, worker: str, lease: float
    ) -> StepRunRecord | None:
        """Take over a run whose lease expired: it is UNKNOWN until ``verify`` (or the ladder)
        says what happened, under a lease of this resolver's own.

        The run keeps its outbox row until the outcome is recorded: a resolver that dies
        mid-``verify`` leaves a message that the reconciler publishes again, and the next
        delivery resolves it. The delivery count is the fence: a zombie's writes lose.
        Returns the run as taken over (its ``deliveries`` is the new token), or None.
        """
        now = self.clock()
        with self._tx(Write.EXPIRE) as conn:
            row = conn.execute(
                sa.update(RUNS)
                .where(
                    RUNS.c.id == run_id,
                    RUNS.c.saga_id == saga_id,
                    sa.or_(
                        RUNS.c.status == StepStatus.RUNNING.value,
                        sa.and_(RUNS.c.status == StepStatus.UNKNOWN.value,
                                RUNS.c.finished_at.is_(None)),
                    ),
                    RUNS.c.lease_expires_at <= self.db_now(),
                )
                .values(status=StepStatus.UNKNOWN.value, lease_expires_at=self.db_in(lease),
                        deliveries=RUNS.c.deliveries + 1, worker=worker)
                .returning(*RUNS.c)
            ).first()
            if row is None:
                return None
            tl = Timeline(saga_id, now, worker=worker)
            run = step_run_record(row)
            tl.run_event(run, "outcome_unknown", f"lease expired; {worker} finds out what "
                         "happened")
            tl.flush(conn)
        return run

    def extend_lease(
        self, saga_id: str, run_id: int, *, worker: str, token: int, lease: float,
        hard_limit: float | None = None,
    ) -> bool:
        """A long step's heartbeat: its lease now ends ``lease`` seconds from now.

        Only the live attempt may extend it: the run still running, under this worker and
        delivery, its lease not yet lapsed. ``hard_limit`` (seconds from the start) bounds
        the whole attempt: past it the lease runs out however often the step beats.
        """
        until = self.db_in(lease)
        if hard_limit is not None and self.fast:
            until = sa.func.least(
                until,
                RUNS.c.started_at + sa.func.make_interval(0, 0, 0, 0, 0, 0,
                                                          sa.literal(float(hard_limit))),
            )
        with self._write(Write.HEARTBEAT) as conn:
            done = conn.execute(
                sa.update(RUNS)
                .where(RUNS.c.id == run_id, RUNS.c.saga_id == saga_id,
                       RUNS.c.status == StepStatus.RUNNING.value, RUNS.c.worker == worker,
                       RUNS.c.deliveries == token,
                       RUNS.c.lease_expires_at > self.db_now())
                .values(lease_expires_at=until)
                .returning(RUNS.c.lease_expires_at > self.db_now())
            ).first()
        return done is not None and bool(done[0])

    def succeed(
        self,
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
    ) -> Outcome:
        """Record a run's result, the checkpoint, and what comes next, in one transaction."""
        if (self.fast and next_run is not None and checkpoint is not None
                and expected is StepStatus.RUNNING and next_run.delay == 0
                and (self.gate is None or not self.gate.active)):
            outcome = self._retrying(lambda: self._advance_fast(
                saga_id, run_id, token, result, checkpoint, next_run, worker, task_id))
            if outcome is not None:
                return outcome
        if (self.fast and next_run is None and checkpoint is not None
                and expected is StepStatus.RUNNING):
            finished = self._retrying(lambda: self._finish_fast(
                saga_id, run_id, token, result, checkpoint, worker, task_id))
            if finished is not None:
                return finished

        def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
            run = self._finish_run(conn, run_id, token, expected, StepStatus.SUCCEEDED, tl,
                                   message, result=result)
            if checkpoint is not None:
                conn.execute(
                    sa.update(SAGAS).where(SAGAS.c.id == saga_id).values(checkpoint=checkpoint)
                )
            if run.direction is Direction.COMPENSATE:
                # The compensation undid what its step created.
                conn.execute(
                    sa.update(RESOURCES)
                    .where(RESOURCES.c.saga_id == saga_id, RESOURCES.c.step == run.step,
                           RESOURCES.c.status == "held")
                    .values(status="released", released_at=tl.now, updated_at=tl.now)
                )
            if saga.state is SagaState.COMPENSATING:
                return self._advance_rollback(conn, saga, tl)
            if saga.state is not SagaState.RUNNING or run.direction is not Direction.FORWARD:
                return []
            if next_run is not None:
                return self._schedule(conn, saga, next_run, tl)[1]
            return self._transition(conn, saga, "finish", tl, finished=True)[1]

        return self._on_saga(Write.SUCCEED, saga_id, op, worker, task_id)

    def _advance_fast(
        self, saga_id: str, run_id: int, token: int, result: Any, checkpoint: dict[str, Any],
        new: NewRun, worker: str | None, task_id: str | None,
    ) -> Outcome | None:
        with self._write(Write.SUCCEED, autocommit=True) as conn:
            dispatch = hotpath.advance(conn, saga_id, run_id, result=result,
                                       checkpoint=checkpoint, new=new, worker=worker,
                                       task_id=task_id, now=self.clock(), token=token)
        if dispatch is None:
            return None  # a guard failed and nothing was written: the general path decides
        return Outcome(True, SagaState.RUNNING, [dispatch])

    def _finish_fast(
        self, saga_id: str, run_id: int, token: int, result: Any, checkpoint: dict[str, Any],
        worker: str | None, task_id: str | None,
    ) -> Outcome | None:
        with self._write(Write.SUCCEED, autocommit=True) as conn:
            done = hotpath.finish(conn, saga_id, run_id, result=result, checkpoint=checkpoint,
                                  worker=worker, task_id=task_id, now=self.clock(), token=token)
        if not done:
            return None  # a guard failed and nothing was written: the general path decides
        state = next_state("*", SagaState.RUNNING, "finish")
        return Outcome(True, state, [], entered=state)

    def fail(
        self,
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
            run = self._finish_run(conn, run_id, token, expected, status, tl, error,
                                   {"then": then.value, "failure": failure},
                                   error=error, error_type=error_type, failure=failure)
            if checkpoint is not None:  # a refresh re-read the world into it
                conn.execute(
                    sa.update(SAGAS).where(SAGAS.c.id == saga_id).values(checkpoint=checkpoint)
                )
            for rung in rungs:
                tl.add("ladder.rung", step=run.step, run_id=run.id,
                       message=rung_text(rung),
                       data={"level": rung.level, "applicable": rung.applicable,
                             "action": rung.action, "reason": rung.reason,
                             "direction": run.direction.value})
            forward = run.direction is Direction.FORWARD
            if saga.state is SagaState.COMPENSATING and forward:
                return self._advance_rollback(conn, saga, tl)  # rolled back meanwhile
            live = SagaState.RUNNING if forward else SagaState.COMPENSATING
            if saga.state is not live:
                return []
            if then is Then.RETRY and retry is not None:
                return self._schedule(conn, saga, retry, tl)[1]
            if then is Then.ROLLBACK and forward:
                return self._start_rollback(conn, saga, tl, f"{run.step} failed: {error}")
            return self._transition(conn, saga, "escalate", tl,
                                    error=f"{run.step} ({run.direction.value}) failed: {error}")[1]

        return self._on_saga(Write.FAIL, saga_id, op, worker, task_id)

    def _finish_run(
        self,
        conn: sa.Connection,
        run_id: int,
        token: int,
        expected: StepStatus,
        status: StepStatus,
        tl: Timeline,
        message: str,
        data: dict[str, Any] | None = None,
        **values: Any,
    ) -> StepRunRecord:
        """The attempt's outcome, guarded: the run still ``expected``, still this delivery's
        (a zombie, whose run was taken over, loses), and not yet resolved."""
        row = conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.status == expected.value,
                   RUNS.c.deliveries == token, RUNS.c.finished_at.is_(None))
            .values(status=status.value, finished_at=tl.now, lease_expires_at=None, **values)
            .returning(*RUNS.c)
        ).first()
        if row is None:
            raise Lost(f"run {run_id} is no longer {expected.value} under delivery {token}")
        # A recovery message the lease sweep wrote meanwhile goes with the attempt.
        conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.step_run_id == run_id))
        run = step_run_record(row)
        tl.run_event(run, status.value, message, data)
        return run

    # -- operators ----------------------------------------------------------------------

    def retry(self, saga_id: str, *, by: str, note: str | None = None) -> Outcome:
        """needs_human → run the rest again: the remaining compensations, or the failed step."""

        def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
            rolling_back = self._escalated_from(conn, saga_id) == "compensating" or bool(
                conn.execute(
                    sa.select(EVENTS.c.id).where(EVENTS.c.saga_id == saga_id,
                                                 EVENTS.c.kind == "rollback.plan").limit(1)
                ).first()
            )
            trigger = "retry_rollback" if rolling_back else "retry_forward"
            tl.add("operator.retry", message=f"{by}: {note or 'retry'}",
                   data={"by": by, "note": note})
            resolved = self._notify(conn, saga, Kind.PAGE, Action.RESOLVE, tl,
                                    note=f"retried by {by}")
            saga, _ = self._transition(conn, saga, trigger, tl)
            if trigger == "retry_rollback":
                return resolved + self._advance_rollback(conn, saga, tl)
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
                after_pivot=self.gate is not None
                and self.gate.after_pivot(saga.name, failed.step),
                reason=f"retried by {by}",
            )
            return resolved + self._schedule(conn, saga, again, tl)[1]

        return self._operator(Write.RETRY, saga_id, op)

    def resolve(self, saga_id: str, *, by: str, note: str) -> Outcome:
        """needs_human → resolved: a human has put things right. Resolves the page."""

        def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
            tl.add("operator.resolve", message=f"{by}: {note}", data={"by": by, "note": note})
            resolved = self._notify(conn, saga, Kind.PAGE, Action.RESOLVE, tl,
                                    note=f"resolved by {by}: {note}")
            return resolved + self._transition(conn, saga, "resolve", tl, finished=True)[1]

        return self._operator(Write.RESOLVE, saga_id, op)

    def _operator(self, name: Write, saga_id: str, op: Any) -> Outcome:
        if self.get_saga(saga_id) is None:
            raise UnknownSagaError(f"no saga with id {saga_id!r}", saga_id=saga_id)
        return self._on_saga(name, saga_id, op, worker="operator")

    def _escalated_from(self, conn: sa.Connection, saga_id: str) -> str | None:
        data = conn.execute(
            sa.select(EVENTS.c.data)
            .where(EVENTS.c.saga_id == saga_id, EVENTS.c.kind == "saga.needs_human")
            .order_by(EVENTS.c.id.desc())
            .limit(1)
        ).scalar()
        return (data or {}).get("from")

    def uncompensated(self, saga_id: str) -> list[str]:
        """Steps whose effect stands and whose compensation has not run, last done first."""
        with self.engine.connect() as conn:
            found = conn.execute(uncompensated_query(saga_id))
            return list(dict.fromkeys(r.step for r in found))

    def get_saga_or_raise(self, saga_id: str) -> SagaRecord:
        saga = self.get_saga(saga_id)
        if saga is None:
            raise UnknownSagaError(f"no saga with id {saga_id!r}", saga_id=saga_id)
        return saga
