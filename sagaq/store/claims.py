"""Claims: a run is taken under a lease before its action runs; a lapsed lease is taken over.

A claim is one statement (one round trip, one commit) for every run, forward or
compensating: the run ``scheduled`` and its saga neither waiting nor awaiting an approval, the
run moved to ``running`` under a lease with its delivery count (the attempt's token) raised,
its outbox row gone, a pending saga started, the events written. When the statement claims
nothing, :func:`not_claimed` reads why and records the dropped delivery.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from sagaq.machine import SagaState, StepStatus, next_state
from sagaq.store.db import Database
from sagaq.store.faults import Write
from sagaq.store.models import EVENTS, OUTBOX, RUNS, SAGAS
from sagaq.store.records import Claim, ClaimStatus, StepRunRecord
from sagaq.store.sql import execute
from sagaq.store.timeline import EVENT_COLUMNS, Timeline, saga_record, step_run_record

_FINAL_RUN = {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.UNKNOWN}


_SAGA_COLUMNS = ", ".join(f"s.{c.name} AS saga__{c.name}" for c in SAGAS.c)
_NOW = "coalesce(%(clock)s, now())"  # the database's clock, unless a test set its own

# The run ``scheduled`` and its saga not held back (waiting, awaiting an approval, or a
# rollback waiting for its next compensation's backoff): ``running`` under a lease, with
# the attempt's token raised; its outbox row gone; a pending saga started; the events; and,
# for a compensation, the result of the step it undoes.
CLAIM = f"""
WITH claimed AS (
  UPDATE {RUNS.name} r SET status = 'running', worker = %(worker)s, task_id = %(task_id)s,
    started_at = {_NOW}, lease_expires_at = {_NOW} + make_interval(secs => %(lease)s),
    deliveries = r.deliveries + 1
  FROM {SAGAS.name} s
  WHERE r.id = %(run_id)s AND r.saga_id = %(saga_id)s AND r.status = 'scheduled'
    AND s.id = r.saga_id AND s.state NOT IN ('waiting', 'awaiting_approval')
    AND (s.wake_at IS NULL OR s.wake_at <= {_NOW})
  RETURNING r.*, {_SAGA_COLUMNS}
), gone AS (
  DELETE FROM {OUTBOX.name} WHERE step_run_id IN (SELECT id FROM claimed)
), started AS (
  UPDATE {SAGAS.name} SET state = %(started_state)s, updated_at = %(now)s
  WHERE id = %(saga_id)s AND state = 'pending' AND EXISTS (SELECT 1 FROM claimed)
  RETURNING id
), events AS (
  INSERT INTO {EVENTS.name} ({", ".join(EVENT_COLUMNS)})
  SELECT id, %(now)s, %(started_kind)s, NULL, NULL, %(worker)s, %(task_id)s,
    %(started_message)s, jsonb_build_object('from', 'pending', 'to', %(started_state)s::text,
    'trigger', 'start') FROM started
  UNION ALL
  SELECT saga_id, %(now)s, CASE WHEN direction = 'forward' THEN 'step.claimed'
    ELSE 'compensation.claimed' END, step, id, %(worker)s, %(task_id)s,
    'attempt ' || attempt || ', delivery ' || deliveries,
    jsonb_build_object('attempt', attempt, 'level', level, 'tier', tier) FROM claimed
)
SELECT c.*, (
  SELECT f.result FROM {RUNS.name} f
  WHERE c.direction = 'compensate' AND f.saga_id = c.saga_id AND f.step = c.step
    AND f.direction = 'forward' AND f.status IN ('succeeded', 'unknown')
  ORDER BY f.id DESC LIMIT 1
) AS forward_result FROM claimed c"""


def claim(
    db: Database, saga_id: str, run_id: int, *, worker: str, task_id: str | None, lease: float
) -> Claim:
    """Mark a scheduled run RUNNING under a lease, and commit, before the action runs."""
    started = next_state("*", SagaState.PENDING, "start")  # the table decides, not the SQL

    def attempt() -> dict[str, Any] | None:
        now = db.clock()
        with db.write(Write.CLAIM, autocommit=True) as conn:
            cur = execute(conn, CLAIM, {
                "run_id": run_id, "saga_id": saga_id, "worker": worker, "task_id": task_id,
                "now": now, "clock": now if db.fixed_clock else None, "lease": float(lease),
                "started_state": started.value, "started_kind": f"saga.{started.value}",
                "started_message": f"pending → {started.value}",
            })
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip((d.name for d in cur.description), row, strict=True))

    m = db.retrying(attempt)
    if m is None:
        return db.retrying(lambda: not_claimed(db, saga_id, run_id, worker, task_id))
    run = step_run_record({c.name: m[c.name] for c in RUNS.c})
    saga = saga_record({c.name: m[f"saga__{c.name}"] for c in SAGAS.c})
    if saga.state is SagaState.PENDING:
        saga = replace(saga, state=started)
    errors: tuple[str, ...] = ()
    if run.attempt > 1:  # earlier attempts' errors, for the step to read
        with db.read() as conn:
            errors = tuple(r.error for r in _round(conn, run) if r.error)
    return Claim(ClaimStatus.CLAIMED, run, saga, m["forward_result"], errors)


def not_claimed(
    db: Database, saga_id: str, run_id: int, worker: str, task_id: str | None
) -> Claim:
    """Why a delivery claimed nothing; a duplicate is dropped, on the timeline."""
    with db.write(Write.CLAIM) as conn:
        row = conn.execute(
            sa.select(RUNS, (RUNS.c.lease_expires_at <= db.db_now()).label("lapsed"))
            .where(RUNS.c.id == run_id, RUNS.c.saga_id == saga_id)
        ).first()
        if row is None:
            return Claim(ClaimStatus.MISSING)
        run = step_run_record({c.name: row._mapping[c.name] for c in RUNS.c})
        unresolved = run.status is StepStatus.UNKNOWN and run.finished_at is None
        if run.status in _FINAL_RUN and not unresolved:
            status, why = ClaimStatus.FINISHED, f"run already {run.status.value}"
        elif run.status is StepStatus.SCHEDULED:
            status, why = ClaimStatus.EARLY, "the saga is waiting (a durable wait or an approval)"
        elif row.lapsed is True:
            return Claim(ClaimStatus.EXPIRED, run)  # its worker died, or a resolver did
        else:
            status, why = ClaimStatus.BUSY, f"running on {run.worker} under a live lease"
        tl = Timeline(saga_id, db.clock(), worker=worker, task_id=task_id)
        tl.run_event(run, "dropped", f"duplicate delivery dropped: {why}")
        tl.flush(conn)
        return Claim(status, run)


def round_of(db: Database, run: StepRunRecord) -> list[StepRunRecord]:
    """The earlier runs of this step in this direction since its last first attempt."""
    with db.read() as conn:
        return _round(conn, run)


def _round(conn: sa.Connection, run: StepRunRecord) -> list[StepRunRecord]:
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
    db: Database, saga_id: str, run_id: int, *, worker: str, lease: float
) -> StepRunRecord | None:
    """Take over a run whose lease expired: it is UNKNOWN until ``verify`` (or the ladder)
    says what happened, under a lease of this resolver's own.

    The run keeps its outbox row until the outcome is recorded: a resolver that dies
    mid-``verify`` leaves a message that the reconciler publishes again, and the next
    delivery resolves it. The delivery count is the fence: a zombie's writes lose.
    Returns the run as taken over (its ``deliveries`` is the new token), or None.
    """
    now = db.clock()
    with db.write(Write.EXPIRE) as conn:
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
                RUNS.c.lease_expires_at <= db.db_now(),
            )
            .values(status=StepStatus.UNKNOWN.value, lease_expires_at=db.db_in(lease),
                    deliveries=RUNS.c.deliveries + 1, worker=worker)
            .returning(*RUNS.c)
        ).first()
        if row is None:
            return None
        tl = Timeline(saga_id, now, worker=worker)
        run = step_run_record(row)
        tl.run_event(run, "outcome_unknown", f"lease expired; {worker} finds out what happened")
        tl.flush(conn)
    return run


def extend_lease(
    db: Database, saga_id: str, run_id: int, *, worker: str, token: int, lease: float,
    hard_limit: float | None = None,
) -> bool:
    """A long step's heartbeat: its lease now ends ``lease`` seconds from now.

    Only the live attempt may extend it: the run still running, under this worker and
    delivery, its lease not yet lapsed. ``hard_limit`` (seconds from the start) bounds
    the whole attempt: past it the lease runs out however often the step beats.
    """
    until = db.db_in(lease)
    if hard_limit is not None:
        until = sa.func.least(
            until,
            RUNS.c.started_at + sa.func.make_interval(0, 0, 0, 0, 0, 0,
                                                      sa.literal(float(hard_limit))),
        )
    with db.write(Write.HEARTBEAT) as conn:
        done = conn.execute(
            sa.update(RUNS)
            .where(RUNS.c.id == run_id, RUNS.c.saga_id == saga_id,
                   RUNS.c.status == StepStatus.RUNNING.value, RUNS.c.worker == worker,
                   RUNS.c.deliveries == token,
                   RUNS.c.lease_expires_at > db.db_now())
            .values(lease_expires_at=until)
            .returning(RUNS.c.lease_expires_at > db.db_now())
        ).first()
    return done is not None and bool(done[0])
