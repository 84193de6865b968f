"""The store's building blocks: transactions, lifecycle moves, scheduling, rollback, notices.

Every state change is a guarded UPDATE (``WHERE state = :expected`` / ``status = :expected``)
that reports whether it won; a loser raises :class:`Lost`, which rolls its whole transaction
back. Whatever should run next (a step run, a notification) is written with its outbox row
in the same transaction, and handed back as a :class:`Dispatch` to publish after the commit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from sagaq.keys import idempotency_key
from sagaq.ladder import Rung
from sagaq.machine import Direction, SagaState, StepStatus, next_state
from sagaq.notify.base import Action, Kind
from sagaq.store.database import autocommit_engine
from sagaq.store.faults import FaultHook, Phase, Write, no_faults
from sagaq.store.models import APPROVALS, NOTIFICATIONS, OUTBOX, RESOURCES, RUNS, SAGAS, UTCDateTime
from sagaq.store.records import Dispatch, NewRun, Outcome, SagaRecord
from sagaq.store.timeline import Timeline, approval_record, saga_record

if TYPE_CHECKING:
    from sagaq.gate import Gate, GateResult

T = TypeVar("T")
NOTIFY_TASK = "sagaq.notify"
RELEASE_TASK = "sagaq.release"

Channels = Mapping[Kind, tuple[str, ...]]
"""Which notification channels receive which kind of notice."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class Lost(Exception):
    """A guard did not match: roll the transaction back and report ``won=False``."""

    def __init__(self, note: str) -> None:
        super().__init__(note)
        self.note = note


class StoreBase:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        clock: Callable[[], datetime] | None = None,
        channels: Channels | None = None,
        gate: Gate | None = None,
        approval_deadline: float = 86400.0,
    ) -> None:
        self.engine = engine
        # Leases and deadlines are compared with the database's clock, never a host's: a
        # worker whose clock is ahead must not expire another's lease. A test may set a clock
        # of its own (to move time past every lease); it then rules everywhere.
        self.clock = clock or utcnow
        self.fixed_clock = clock is not None
        self.fault: FaultHook = no_faults  # the crash-point hook (see sagaq.store.faults)
        self.channels: Channels = channels or {Kind.PAGE: ("log",), Kind.NOTIFY: ("log",)}
        self.gate = gate  # the policy gate before every dispatch; None: allow everything
        self.approval_deadline = approval_deadline
        # PostgreSQL: the hot writes are single statements, run in autocommit on a pool of
        # their own (switching a pooled connection in and out of autocommit costs round trips).
        self.fast = engine.dialect.name == "postgresql"
        self.autocommit = autocommit_engine(engine) if self.fast else engine

    def dispose(self, *, close: bool = True) -> None:
        """Forget pooled connections; ``close=False`` after a fork (the parent owns them)."""
        self.engine.dispose(close=close)
        if self.autocommit is not self.engine:
            self.autocommit.dispose(close=close)

    # -- transactions -------------------------------------------------------------------

    def db_now(self) -> Any:
        """``now()`` as SQL: the database's clock, or the test's clock when one is set."""
        if self.fixed_clock or not self.fast:  # SQLite (the demo) has no now(): the host's
            return sa.literal(self.clock(), UTCDateTime())
        return sa.func.now()

    def db_in(self, seconds: float) -> Any:
        """``now() + seconds`` as SQL, on the same clock as :meth:`db_now`."""
        if self.fixed_clock or not self.fast:
            return sa.literal(self.clock() + timedelta(seconds=seconds), UTCDateTime())
        return self.db_now() + sa.func.make_interval(0, 0, 0, 0, 0, 0, sa.literal(float(seconds)))

    @contextmanager
    def _write(
        self, name: Write, *, session: Session | None = None, autocommit: bool = False
    ) -> Iterator[sa.Connection]:
        """The one place where the store commits. Every crash point is here.

        ``before``: the statements ran, the commit has not (raising rolls them back; on an
        autocommit connection it is before the one statement); ``after``: committed.
        With ``session``, the caller's transaction: the caller commits, or not.
        """
        if session is not None:
            yield session.connection()
            self.fault(name, Phase.BEFORE)
            return
        if autocommit:
            with self.autocommit.connect() as conn:
                self.fault(name, Phase.BEFORE)
                yield conn
        else:
            with self.engine.begin() as conn:
                yield conn
                self.fault(name, Phase.BEFORE)
        self.fault(name, Phase.AFTER)

    @contextmanager
    def _tx(self, name: Write, session: Session | None = None) -> Iterator[sa.Connection]:
        with self._write(name, session=session) as conn:
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

    def _on_saga(
        self,
        name: Write,
        saga_id: str,
        op: Callable[[sa.Connection, SagaRecord, Timeline], list[Dispatch]],
        worker: str | None = None,
        task_id: str | None = None,
    ) -> Outcome:
        """Run ``op`` in one transaction, holding the saga row's lock (always taken first)."""

        def attempt() -> Outcome:
            now = self.clock()
            try:
                with self._tx(name) as conn:
                    row = conn.execute(
                        sa.update(SAGAS)
                        .where(SAGAS.c.id == saga_id)
                        .values(updated_at=now)
                        .returning(*SAGAS.c)
                    ).first()
                    if row is None:
                        raise Lost(f"saga {saga_id} does not exist")
                    tl = Timeline(saga_id, now, worker=worker, task_id=task_id)
                    saga = saga_record(row)
                    dispatches = op(conn, saga, tl)
                    tl.flush(conn)
            except Lost as lost:
                return Outcome(False, note=lost.note)
            return Outcome(True, tl.entered or saga.state, dispatches, entered=tl.entered)

        return self._retrying(attempt)

    # -- lifecycle ----------------------------------------------------------------------

    def _transition(
        self,
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
            dispatches = self._notify(conn, moved, Kind.PAGE, Action.TRIGGER, tl)
        if new is SagaState.COMPENSATED:
            # Whatever its steps registered and no compensation undid is now an orphan.
            conn.execute(
                sa.update(RESOURCES)
                .where(RESOURCES.c.saga_id == saga.id, RESOURCES.c.status == "held")
                .values(status="orphaned", updated_at=tl.now)
            )
        return moved, dispatches

    def _notify(
        self,
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
        for channel in self.channels.get(kind, ()):
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
            stmt = self._insert(conn)(NOTIFICATIONS).values(**values).on_conflict_do_nothing()
            notification_id = conn.execute(stmt.returning(NOTIFICATIONS.c.id)).scalar()
            if notification_id is None:
                continue  # this incident already has it: one incident, one page
            dispatches.append(self._outbox(conn, saga.id, NOTIFY_TASK, notification_id, tl.now,
                                           ref="notification_id"))
            tl.add(f"{kind.value}.queued", message=f"{action.value} via {channel}",
                   data={"channel": channel, "incident": saga.incident, "action": action.value})
        return dispatches

    def _outbox(
        self,
        conn: sa.Connection,
        saga_id: str,
        task_name: str,
        ref_id: int,
        available_at: datetime,
        *,
        ref: str,
        countdown: float = 0.0,
    ) -> Dispatch:
        """An outbox row for a message about one step run, notification or resource."""
        message_id = str(uuid.uuid4())
        conn.execute(
            sa.insert(OUTBOX).values(
                saga_id=saga_id,
                **{ref: ref_id},
                task_name=task_name,
                args=[saga_id, ref_id],
                message_id=message_id,
                available_at=available_at,
                created_at=self.clock(),
            )
        )
        return Dispatch(task_name, (saga_id, ref_id), message_id, countdown)

    # -- scheduling ---------------------------------------------------------------------

    def _schedule(
        self, conn: sa.Connection, saga: SagaRecord, new: NewRun, tl: Timeline
    ) -> tuple[SagaRecord, list[Dispatch]]:
        """Insert a scheduled run and its message. A durable delay parks the saga instead.

        A delay longer than a Celery countdown should carry is never put in Redis: the saga
        moves to ``waiting`` with ``wake_at``, and the reconciler publishes when it is due.
        """
        verdict = self._gate(conn, saga, new, tl)
        if verdict is not None and verdict.decision.value == "deny":
            rule = verdict.rule.id if verdict.rule else "?"
            return saga, self._denied(conn, saga, new, tl, f"denied by policy rule {rule}")
        parked = verdict is not None and verdict.decision.value == "require_human"
        not_before = tl.now + timedelta(seconds=new.delay) if new.delay > 0 else None
        message_id = str(uuid.uuid4())
        run_id = conn.execute(
            sa.insert(RUNS)
            .values(
                saga_id=saga.id,
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
                level=new.level,
                tier=new.tier,
                scheduled_at=tl.now,
            )
            .returning(RUNS.c.id)
        ).scalar_one()
        conn.execute(
            sa.insert(OUTBOX).values(
                saga_id=saga.id,
                step_run_id=run_id,
                task_name=new.task_name,
                args=[saga.id, run_id],
                message_id=message_id,
                available_at=not_before or tl.now,
                created_at=tl.now,
            )
        )
        detail = new.reason or f"attempt {new.attempt}"
        if new.delay > 0:
            detail += f", in {new.delay:.2f}s"
        prefix = "step" if new.direction is Direction.FORWARD else "compensation"
        tl.add(f"{prefix}.scheduled", step=new.step, run_id=run_id, message=detail,
               data={"attempt": new.attempt, "delay": new.delay, "level": new.level,
                     "tier": new.tier})
        dispatch = Dispatch(new.task_name, (saga.id, run_id), message_id, new.delay)
        if parked:
            assert verdict is not None
            return self._park(conn, saga, new, run_id, tl, verdict)
        if new.durable and saga.state is SagaState.RUNNING:
            saga, _ = self._transition(conn, saga, "wait", tl, wake_at=not_before)
            return saga, []  # published by the reconciler at wake_at, not now
        if new.durable and saga.state is SagaState.COMPENSATING:
            # A compensation's long backoff waits in Postgres too (DESIGN §4.10), never as a
            # long countdown in Redis; the rollback stays compensating until it is woken.
            conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga.id)
                         .values(wake_at=not_before, updated_at=tl.now))
            return replace(saga, wake_at=not_before), []
        return saga, [dispatch]

    # -- the policy gate ----------------------------------------------------------------

    def _gate(
        self, conn: sa.Connection, saga: SagaRecord, new: NewRun, tl: Timeline
    ) -> GateResult | None:
        """The verdict on this dispatch, written to the timeline; None when no policy."""
        if self.gate is None or not self.gate.active:
            return None
        approvals = []
        if self.gate.needs_approvals(saga.name, new.step, new.direction):
            approvals = [
                approval_record(r) for r in conn.execute(
                    sa.select(APPROVALS).where(APPROVALS.c.saga_id == saga.id,
                                               APPROVALS.c.step == new.step)
                )
            ]
        result = self.gate.check(saga.name, new.step, new.direction, approvals)
        v = result.verdict
        prefix = "step" if new.direction is Direction.FORWARD else "compensation"
        detail = f"{result.decision.value}" + (f" by rule {v.rule_id}" if v.rule_id else "")
        if result.approval is not None:
            detail += f" (approved by {result.approval.decided_by})"
        if result.note:
            detail += f"; {result.note}"
        tl.add("policy.verdict", step=new.step, message=f"{prefix}: {detail}",
               data={"decision": result.decision.value, "matched": list(v.matched),
                     "rule": v.rule_id, "direction": new.direction.value,
                     "policy": self.gate.policy.label,
                     "approval": result.approval.id if result.approval else None})
        return result

    def _denied(
        self, conn: sa.Connection, saga: SagaRecord, new: NewRun, tl: Timeline, why: str
    ) -> list[Dispatch]:
        """A denied dispatch: recorded as skipped, never run; then the ladder climbs."""
        run_id = conn.execute(
            sa.insert(RUNS).values(
                saga_id=saga.id, step=new.step, step_index=new.step_index,
                direction=new.direction.value, attempt=new.attempt,
                status=StepStatus.SKIPPED.value, task_name=new.task_name,
                compensate_task=new.compensate_task, idempotency_key=new.idempotency_key,
                message_id=str(uuid.uuid4()), deliveries=0, level=3, error=why,
                error_type="PolicyDenied", failure="terminal", scheduled_at=tl.now,
                finished_at=tl.now,
            ).returning(RUNS.c.id)
        ).scalar_one()
        forward = new.direction is Direction.FORWARD
        prefix = "step" if forward else "compensation"
        tl.add(f"{prefix}.skipped", step=new.step, run_id=run_id, message=why,
               data={"direction": new.direction.value})
        if forward and not new.after_pivot:
            self._rungs(tl, new, run_id, [(1, False), (2, False), (3, True)], why)
            trigger = "deny" if saga.state is SagaState.AWAITING_APPROVAL else "rollback"
            return self._start_rollback(conn, saga, tl, f"{new.step}: {why}", trigger)
        # After the pivot nothing is undone; a denied compensation must be undone by hand.
        levels = [(3, False), (4, True)] if forward else [(4, True)]
        self._rungs(tl, new, run_id, levels, why)
        what = "" if forward else " (undo it by hand)"
        return self._transition(conn, saga, "escalate", tl, error=f"{new.step}: {why}{what}")[1]

    def _rungs(self, tl: Timeline, new: NewRun, run_id: int, levels: list[tuple[int, bool]],
               why: str) -> None:
        for level, applicable in levels:
            action = {3: "compensate", 4: "page"}.get(level, "not applicable")
            if not applicable:
                action = "not applicable"
            tl.add("ladder.rung", step=new.step, run_id=run_id,
                   message=rung_text(Rung(level, applicable, action, why)),
                   data={"level": level, "applicable": applicable, "action": action,
                         "reason": why, "direction": new.direction.value})

    def _park(
        self, conn: sa.Connection, saga: SagaRecord, new: NewRun, run_id: int, tl: Timeline,
        verdict: GateResult,
    ) -> tuple[SagaRecord, list[Dispatch]]:
        """require_human: ask once, durably; the saga waits holding no worker."""
        from sagaq.gate import approval_id

        assert verdict.rule is not None and self.gate is not None
        rule = verdict.rule
        request = approval_id(saga.id, new.step, new.direction.value, rule)
        deadline = tl.now + timedelta(seconds=rule.deadline or self.approval_deadline)
        stmt = self._insert(conn)(APPROVALS).values(
            id=request, saga_id=saga.id, step=new.step, direction=new.direction.value,
            step_run_id=run_id, rule_id=rule.id, rule_fingerprint=rule.fingerprint,
            policy_version=self.gate.policy.label, status="pending", deadline=deadline,
            requested_at=tl.now, requested_by=tl.worker,
        ).on_conflict_do_nothing()
        existing = conn.execute(
            sa.select(APPROVALS.c.status).where(APPROVALS.c.id == request)
        ).scalar()
        if existing == "denied":
            # Asked again after a denial (an operator's retry): the same request, reopened.
            conn.execute(
                sa.update(APPROVALS).where(APPROVALS.c.id == request).values(
                    status="pending", deadline=deadline, requested_at=tl.now,
                    step_run_id=run_id, decided_at=None, decided_by=None, decided_under=None,
                    note=None, policy_version=self.gate.policy.label, requested_by=tl.worker,
                )
            )
            tl.add("approval.requested", step=new.step, run_id=run_id,
                   message=f"rule {rule.id}: approval {request[:8]} asked again after its "
                           f"denial, deadline {deadline.isoformat(timespec='seconds')}",
                   data={"approval": request, "rule": rule.id, "deadline": deadline.isoformat(),
                         "direction": new.direction.value, "again": True})
        # RETURNING, not rowcount: an INSERT's rowcount is -1 on PostgreSQL (psycopg).
        elif conn.execute(stmt.returning(APPROVALS.c.id)).first() is not None:
            tl.add("approval.requested", step=new.step, run_id=run_id,
                   message=f"rule {rule.id}: approval {request[:8]} requested, deadline "
                           f"{deadline.isoformat(timespec='seconds')}",
                   data={"approval": request, "rule": rule.id, "deadline": deadline.isoformat(),
                         "direction": new.direction.value})
        else:  # asked before (a retry, a redelivery): point the request at this run
            conn.execute(sa.update(APPROVALS).where(APPROVALS.c.id == request)
                         .values(step_run_id=run_id))
        saga, _ = self._transition(conn, saga, "request_approval", tl)
        notices = self._notify(conn, saga, Kind.NOTIFY, Action.TRIGGER, tl,
                               note=f"approval {request} needed: rule {rule.id}, step "
                                    f"{new.step}; `sagaq approve {request} --by NAME`",
                               subject=f"approval:{request}")
        return saga, notices

    # -- rollback -----------------------------------------------------------------------

    def _start_rollback(
        self, conn: sa.Connection, saga: SagaRecord, tl: Timeline, reason: str,
        trigger: str = "rollback",
    ) -> list[Dispatch]:
        saga, _ = self._transition(conn, saga, trigger, tl, error=reason)
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
        notices = self._notify(conn, saga, Kind.NOTIFY, Action.TRIGGER, tl)
        return notices + self._advance_rollback(conn, saga, tl)

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
        nxt = self._next_compensation(conn, saga.id)
        if nxt is None:
            _, pages = self._transition(conn, saga, "finish_rollback", tl, finished=True)
            return pages
        new = NewRun(
            step=nxt.step,
            step_index=nxt.step_index,
            direction=Direction.COMPENSATE,
            attempt=1,
            task_name=nxt.compensate_task,
            idempotency_key=idempotency_key(saga.id, nxt.step, Direction.COMPENSATE),
            reason="undo (last done, first undone)",
        )
        return self._schedule(conn, saga, new, tl)[1]

    def _next_compensation(self, conn: sa.Connection, saga_id: str) -> Any:
        return conn.execute(uncompensated_query(saga_id).limit(1)).first()


def uncompensated_query(saga_id: str) -> sa.Select[Any]:
    """Forward runs that succeeded (or may have) and whose compensation has not: LIFO."""
    comp = RUNS.alias("comp")
    undone = sa.exists().where(
        comp.c.saga_id == saga_id,
        comp.c.direction == Direction.COMPENSATE.value,
        comp.c.step == RUNS.c.step,
        comp.c.status == StepStatus.SUCCEEDED.value,
    )
    return (
        sa.select(RUNS.c.step, RUNS.c.step_index, RUNS.c.compensate_task)
        .where(
            RUNS.c.saga_id == saga_id,
            RUNS.c.direction == Direction.FORWARD.value,
            RUNS.c.status.in_([StepStatus.SUCCEEDED.value, StepStatus.UNKNOWN.value]),
            RUNS.c.compensate_task.is_not(None),
            ~undone,
        )
        .order_by(RUNS.c.step_index.desc(), RUNS.c.id.desc())
    )


def rung_text(rung: Any) -> str:
    """One ladder rung as the timeline says it ("rung 1: not applicable: why")."""
    if rung.applicable or rung.action == "not applicable":
        return f"rung {rung.level}: {rung.action}: {rung.reason}"
    return f"rung {rung.level}: {rung.action} (not applicable): {rung.reason}"


def dedup_key(saga_id: str, incident: int) -> str:
    """Stable per incident: every redelivery and every channel says the same key."""
    return f"sagaq/{saga_id}/incident-{incident}"
