"""Deciding approval requests: a human (or the deadline) approves or denies a dispatch."""

from __future__ import annotations

import sqlalchemy as sa

from sagaq.errors import InputError, UnknownSagaError
from sagaq.keys import MIN_PREFIX
from sagaq.machine import Direction
from sagaq.store.db import Database, Lost
from sagaq.store.dispatch import denied, schedule
from sagaq.store.faults import Write
from sagaq.store.lifecycle import transition
from sagaq.store.models import APPROVALS, OUTBOX, RUNS
from sagaq.store.records import ApprovalRecord, Dispatch, NewRun, Outcome, SagaRecord
from sagaq.store.timeline import Timeline, approval_record, step_run_record


def approvals(
    db: Database, *, saga_id: str | None = None, status: str | None = None
) -> list[ApprovalRecord]:
    query = sa.select(APPROVALS).order_by(APPROVALS.c.requested_at)
    if saga_id is not None:
        query = query.where(APPROVALS.c.saga_id == saga_id)
    if status is not None:
        query = query.where(APPROVALS.c.status == status)
    with db.read() as conn:
        return [approval_record(r) for r in conn.execute(query)]


def find_approval(db: Database, ref: str) -> ApprovalRecord:
    """An approval by its id or a unique prefix of at least ``MIN_PREFIX`` characters,
    matched literally (``_`` and ``%`` are not wildcards)."""
    ref = ref.strip()
    with db.read() as conn:
        rows = conn.execute(
            sa.select(APPROVALS)
            .where(APPROVALS.c.id.startswith(ref, autoescape=True))
            .limit(2)
        ).all() if len(ref) >= MIN_PREFIX else []
    if len(rows) != 1:
        more = " (more than one matches)" if len(rows) > 1 else ""
        raise UnknownSagaError(f"no approval request {ref!r}{more}; see `sagaq approvals`")
    return approval_record(rows[0])


def decide(db: Database, approval_id: str, *, approve: bool, by: str, note: str | None = None,
           policy: str = "") -> Outcome:
    """pending → approved (the step is dispatched, gated again) or denied (the ladder)."""
    found = find_approval(db, approval_id)

    def op(conn: sa.Connection, saga: SagaRecord, tl: Timeline) -> list[Dispatch]:
        return _decide(db, conn, saga, tl, found.id, approve, by, note, policy)

    outcome = db.on_saga(Write.DECIDE, found.saga_id, op, worker=by)
    if not outcome.won:
        raise InputError(f"approval {found.id[:8]} is no longer pending ({outcome.note})")
    return outcome


def _decide(db: Database, conn: sa.Connection, saga: SagaRecord, tl: Timeline, request: str,
            approve: bool, by: str, note: str | None, policy: str) -> list[Dispatch]:
    status = "approved" if approve else "denied"
    row = conn.execute(
        sa.update(APPROVALS)
        .where(APPROVALS.c.id == request, APPROVALS.c.status == "pending")
        .values(status=status, decided_by=by, decided_at=tl.now, decided_under=policy,
                note=note)
        .returning(*APPROVALS.c)
    ).first()
    if row is None:
        raise Lost("already decided")
    ap = approval_record(row)
    tl.add(f"approval.{status}", step=ap.step,
           message=f"{by}: {note or status} (rule {ap.rule_id}, policy {policy})",
           data={"approval": ap.id, "by": by, "note": note, "rule": ap.rule_id,
                 "policy": policy, "requested_under": ap.policy_version})
    parked = _unpark(db, conn, saga.name, ap)
    if parked is None:
        return []
    forward = parked.direction is Direction.FORWARD
    if not approve:
        why = f"approval denied by {by}" + (f": {note}" if note else "")
        return denied(db, conn, saga, parked, tl, why)
    trigger = "approve" if forward else "approve_rollback"
    saga, _ = transition(db, conn, saga, trigger, tl)
    return schedule(db, conn, saga, parked, tl)[1]  # gated again, now approved


def _unpark(db: Database, conn: sa.Connection, saga_name: str, ap: ApprovalRecord) -> NewRun | None:
    """Take back the run that waited for this approval; scheduling it again re-checks."""
    row = conn.execute(
        sa.select(RUNS).where(RUNS.c.id == ap.step_run_id, RUNS.c.status == "scheduled")
    ).first()
    if row is None:
        return None
    run = step_run_record(row)
    conn.execute(sa.delete(OUTBOX).where(OUTBOX.c.step_run_id == run.id))
    conn.execute(sa.delete(RUNS).where(RUNS.c.id == run.id))
    return NewRun(
        step=run.step, step_index=run.step_index, direction=run.direction,
        attempt=run.attempt, task_name=run.task_name,
        idempotency_key=run.idempotency_key, compensate_task=run.compensate_task,
        level=run.level, tier=run.tier,
        after_pivot=db.gate is not None and run.direction is Direction.FORWARD
        and db.gate.after_pivot(saga_name, run.step),
        reason="dispatched after the decision",
    )


def expire_approvals(db: Database, batch: int = 100) -> list[Dispatch]:
    """Requests past their deadline are denied by the reconciler: the saga rolls back."""
    with db.read() as conn:
        due = conn.execute(
            sa.select(APPROVALS.c.id)
            .where(APPROVALS.c.status == "pending", APPROVALS.c.deadline <= db.db_now())
            .order_by(APPROVALS.c.deadline)
            .limit(batch)
        ).scalars().all()
    out: list[Dispatch] = []
    for request in due:
        try:
            label = db.gate.policy.label if db.gate is not None else "none"
            out += decide(db, request, approve=False, by="reconciler",
                               note="the deadline passed", policy=label).dispatches
        except InputError:
            continue  # decided meanwhile, by a human or another reconciler
    return out
