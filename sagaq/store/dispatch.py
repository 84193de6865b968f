"""What runs next: scheduling a step run (through the policy gate), approvals parked, denials,
and the rollback's plan (last done, first undone).

Each function runs inside a write that holds the saga row's lock, and returns the messages
to publish after the commit.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from sagaq.keys import approval_id, idempotency_key
from sagaq.kinds import Action, Kind
from sagaq.ladder import Rung
from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.store.db import Database
from sagaq.store.lifecycle import add_rung, notify, transition
from sagaq.store.models import APPROVALS, OUTBOX, RUNS, SAGAS
from sagaq.store.records import Dispatch, NewRun, SagaRecord
from sagaq.store.sql import execute
from sagaq.store.timeline import Timeline, approval_record

# A scheduled run and its outbox row, written from ``{source}`` (a CTE or subquery with a
# ``saga_id`` column): the one definition, used on its own (below) and inside the one-statement
# start and advance (:mod:`sagaq.store.advance`). Due at ``not_before``, else now.
NEXT_RUN = """
nxt AS (
  INSERT INTO sagaq_step_runs (saga_id, step, step_index, direction, attempt, status,
    task_name, compensate_task, idempotency_key, message_id, deliveries, not_before, level,
    tier, scheduled_at)
  SELECT saga_id, %(step)s, %(step_index)s, %(direction)s, %(attempt)s, 'scheduled',
    %(task_name)s, %(compensate_task)s, %(idempotency_key)s, %(message_id)s, 0,
    %(not_before)s, %(level)s, %(tier)s, %(now)s FROM {source}
  RETURNING id, saga_id
), message AS (
  INSERT INTO sagaq_outbox (saga_id, step_run_id, task_name, args, message_id,
    available_at, created_at)
  SELECT saga_id, id, %(task_name)s, jsonb_build_array(saga_id, id), %(message_id)s,
    coalesce(%(not_before)s::timestamptz, %(now)s), %(now)s FROM nxt
)"""

INSERT_RUN = ("WITH src AS (SELECT %(saga_id)s::varchar AS saga_id), "
              + NEXT_RUN.format(source="src").strip() + " SELECT id FROM nxt")


def run_params(new: NewRun, message_id: str, not_before: Any = None) -> dict[str, Any]:
    """The parameters of :data:`NEXT_RUN` for ``new``."""
    return {
        "step": new.step, "step_index": new.step_index, "direction": new.direction.value,
        "attempt": new.attempt, "task_name": new.task_name,
        "compensate_task": new.compensate_task, "idempotency_key": new.idempotency_key,
        "message_id": message_id, "not_before": not_before, "level": new.level,
        "tier": new.tier, "reason": new.reason or f"attempt {new.attempt}",
    }


def insert_run(conn: sa.Connection, saga_id: str, new: NewRun, tl: Timeline, *,
               not_before: Any = None, message_id: str | None = None) -> int:
    """Write a scheduled run with its outbox row, and return its id."""
    params = run_params(new, message_id or str(uuid.uuid4()), not_before)
    return int(execute(conn, INSERT_RUN, {**params, "saga_id": saga_id, "now": tl.now})
               .fetchone()[0])


def schedule(
    db: Database, conn: sa.Connection, saga: SagaRecord, new: NewRun, tl: Timeline
) -> tuple[SagaRecord, list[Dispatch]]:
    """Insert a scheduled run and its message. A durable delay parks the saga instead.

    A delay longer than a Celery countdown should carry is never put in Redis: the saga
    moves to ``waiting`` with ``wake_at``, and the reconciler publishes when it is due.
    """
    verdict = gate_verdict(db, conn, saga.name, saga.id, new, tl)
    if verdict is not None and verdict.decision.value == "deny":
        rule = verdict.rule.id if verdict.rule else "?"
        return saga, denied(db, conn, saga, new, tl, f"denied by policy rule {rule}")
    parked = verdict is not None and verdict.decision.value == "require_human"
    not_before = tl.now + timedelta(seconds=new.delay) if new.delay > 0 else None
    message_id = str(uuid.uuid4())
    run_id = insert_run(conn, saga.id, new, tl, not_before=not_before, message_id=message_id)
    detail = new.reason or f"attempt {new.attempt}"
    if new.delay > 0:
        detail += f", in {new.delay:.2f}s"
    prefix = "step" if new.direction is Direction.FORWARD else "compensation"
    tl.add(f"{prefix}.scheduled", step=new.step, run_id=run_id, message=detail,
           data={"attempt": new.attempt, "delay": new.delay, "level": new.level,
                 "tier": new.tier})
    if parked:
        return park(db, conn, saga, new, run_id, tl, verdict)
    if new.durable and saga.state is SagaState.RUNNING:
        saga, _ = transition(db, conn, saga, "wait", tl, wake_at=not_before)
        return saga, []  # published by the reconciler at wake_at, not now
    if new.durable and saga.state is SagaState.COMPENSATING:
        # A compensation's long backoff waits in Postgres too (DESIGN §4.10), never as a
        # long countdown in Redis; the rollback stays compensating until it is woken.
        conn.execute(sa.update(SAGAS).where(SAGAS.c.id == saga.id)
                     .values(wake_at=not_before, updated_at=tl.now))
        return replace(saga, wake_at=not_before), []
    return saga, [Dispatch(new.task_name, (saga.id, run_id), message_id, new.delay)]


def gate_verdict(
    db: Database, conn: sa.Connection, name: str, saga_id: str, new: NewRun, tl: Timeline
) -> Any:
    """The verdict on this dispatch, written to the timeline; None when no policy."""
    gate = db.gate
    if gate is None or not gate.active:
        return None
    approvals = []
    if gate.needs_approvals(name, new.step, new.direction):
        approvals = [
            approval_record(r) for r in conn.execute(
                sa.select(APPROVALS).where(APPROVALS.c.saga_id == saga_id,
                                           APPROVALS.c.step == new.step)
            )
        ]
    result = gate.check(name, new.step, new.direction, approvals)
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
                 "policy": gate.policy.label,
                 "approval": result.approval.id if result.approval else None})
    return result


def denied(
    db: Database, conn: sa.Connection, saga: SagaRecord, new: NewRun, tl: Timeline, why: str
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
        for level, applicable in [(1, False), (2, False), (3, True)]:
            _rung(tl, new, run_id, level, applicable, why)
        trigger = "deny" if saga.state is SagaState.AWAITING_APPROVAL else "rollback"
        return start_rollback(db, conn, saga, tl, f"{new.step}: {why}", trigger)
    # After the pivot nothing is undone; a denied compensation must be undone by hand.
    for level, applicable in [(3, False), (4, True)] if forward else [(4, True)]:
        _rung(tl, new, run_id, level, applicable, why)
    what = "" if forward else " (undo it by hand)"
    return transition(db, conn, saga, "escalate", tl, error=f"{new.step}: {why}{what}")[1]


def _rung(tl: Timeline, new: NewRun, run_id: int, level: int, applicable: bool,
          why: str) -> None:
    action = {3: "compensate", 4: "page"}.get(level, "not applicable") if applicable \
        else "not applicable"
    add_rung(tl, Rung(level, applicable, action, why), new.direction.value, step=new.step,
             run_id=run_id)


def park(
    db: Database, conn: sa.Connection, saga: SagaRecord, new: NewRun, run_id: int,
    tl: Timeline, verdict: Any,
) -> tuple[SagaRecord, list[Dispatch]]:
    """require_human: ask once, durably; the saga waits holding no worker."""
    assert verdict.rule is not None and db.gate is not None
    rule = verdict.rule
    label = db.gate.policy.label
    request = approval_id(saga.id, new.step, new.direction.value, rule.id, rule.fingerprint)
    deadline = tl.now + timedelta(seconds=rule.deadline or db.approval_deadline)
    stmt = insert(APPROVALS).values(
        id=request, saga_id=saga.id, step=new.step, direction=new.direction.value,
        step_run_id=run_id, rule_id=rule.id, rule_fingerprint=rule.fingerprint,
        policy_version=label, status="pending", deadline=deadline,
        requested_at=tl.now, requested_by=tl.worker,
    ).on_conflict_do_nothing()
    existing = conn.execute(
        sa.select(APPROVALS.c.status).where(APPROVALS.c.id == request)
    ).scalar()
    data = {"approval": request, "rule": rule.id, "deadline": deadline.isoformat(),
            "direction": new.direction.value}
    until = deadline.isoformat(timespec="seconds")
    if existing == "denied":
        # Asked again after a denial (an operator's retry): the same request, reopened.
        conn.execute(
            sa.update(APPROVALS).where(APPROVALS.c.id == request).values(
                status="pending", deadline=deadline, requested_at=tl.now,
                step_run_id=run_id, decided_at=None, decided_by=None, decided_under=None,
                note=None, policy_version=label, requested_by=tl.worker,
            )
        )
        tl.add("approval.requested", step=new.step, run_id=run_id,
               message=f"rule {rule.id}: approval {request[:8]} asked again after its "
                       f"denial, deadline {until}", data={**data, "again": True})
    # RETURNING, not rowcount: an INSERT's rowcount is -1 on PostgreSQL (psycopg).
    elif conn.execute(stmt.returning(APPROVALS.c.id)).first() is not None:
        tl.add("approval.requested", step=new.step, run_id=run_id,
               message=f"rule {rule.id}: approval {request[:8]} requested, deadline {until}",
               data=data)
    else:  # asked before (a retry, a redelivery): point the request at this run
        conn.execute(sa.update(APPROVALS).where(APPROVALS.c.id == request)
                     .values(step_run_id=run_id))
    saga, _ = transition(db, conn, saga, "request_approval", tl)
    notices = notify(db, conn, saga, Kind.NOTIFY, Action.TRIGGER, tl,
                     note=f"approval {request} needed: rule {rule.id}, step "
                          f"{new.step}; `sagaq approve {request} --by NAME`",
                     subject=f"approval:{request}")
    return saga, notices


# -- rollback -------------------------------------------------------------------------------


def start_rollback(
    db: Database, conn: sa.Connection, saga: SagaRecord, tl: Timeline, reason: str,
    trigger: str = "rollback",
) -> list[Dispatch]:
    saga, _ = transition(db, conn, saga, trigger, tl, error=reason)
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
    notices = notify(db, conn, saga, Kind.NOTIFY, Action.TRIGGER, tl)
    return notices + advance_rollback(db, conn, saga, tl)


@functools.cache
def _next_compensation() -> Any:
    """Whether a run is in flight, and the last forward run done (or maybe done) whose
    compensation has not succeeded: one statement per compensation."""
    saga_id = sa.bindparam("saga_id", type_=sa.String())
    busy = sa.exists().where(
        RUNS.c.saga_id == saga_id,
        RUNS.c.status.in_([StepStatus.SCHEDULED.value, StepStatus.RUNNING.value]),
    )
    pending = uncompensated_query(saga_id).limit(1).subquery()
    one = sa.select(sa.literal(1).label("one")).subquery()
    return sa.select(busy.label("busy"), pending.c.step, pending.c.step_index,
                     pending.c.compensate_task).select_from(one.outerjoin(pending, sa.true()))


def advance_rollback(
    db: Database, conn: sa.Connection, saga: SagaRecord, tl: Timeline
) -> list[Dispatch]:
    """Schedule the next compensation (LIFO), or finish the rollback when none is left."""
    busy, step, step_index, compensate_task = conn.execute(
        _next_compensation(), {"saga_id": saga.id}).one()
    if busy:
        return []  # a run is in flight: its own completion advances the rollback
    if step is None:
        return transition(db, conn, saga, "finish_rollback", tl, finished=True)[1]
    new = NewRun(
        step=step,
        step_index=step_index,
        direction=Direction.COMPENSATE,
        attempt=1,
        task_name=compensate_task,
        idempotency_key=idempotency_key(saga.id, step, Direction.COMPENSATE),
        reason="undo (last done, first undone)",
    )
    return schedule(db, conn, saga, new, tl)[1]


def uncompensated_query(saga_id: Any) -> sa.Select[Any]:
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
