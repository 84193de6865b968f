"""Claims: a run is taken under a lease before its action runs; a lapsed lease is taken over.

A claim is one statement (one round trip, one commit) for every run, forward or
compensating: the run ``scheduled`` and its saga neither waiting nor awaiting an approval, the
run moved to ``running`` under a lease with its delivery count (the attempt's token) raised,
its outbox row gone, a pending saga started, the events written. When the statement claims
nothing, :func:`not_claimed` reads why and records the dropped delivery.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from sagaq.machine import Direction, SagaState, StepStatus, next_state
from sagaq.store.db import Database
from sagaq.store.faults import Write
from sagaq.store.models import EVENTS, OUTBOX, RUNS, SAGAS, UTCDateTime
from sagaq.store.records import Claim, ClaimStatus, StepRunRecord
from sagaq.store.sql import run_compiled
from sagaq.store.timeline import EVENT_COLUMNS, Timeline, saga_record, step_run_record

_FINAL_RUN = {StepStatus.SUCCEEDED, StepStatus.FAILED, StepStatus.SKIPPED, StepStatus.UNKNOWN}


class _Row:
    """A dict dressed as a row, for the record builders."""

    def __init__(self, mapping: dict[str, Any]) -> None:
        self._mapping = mapping


def _p(name: str, type_: Any = None) -> Any:
    type_ = type_ if type_ is not None else sa.Text()
    return sa.cast(sa.bindparam(name, type_=type_), type_)


def _db_now() -> Any:
    """The database's clock, unless the store runs on a test clock (``clock``)."""
    return sa.func.coalesce(_p("clock", UTCDateTime()), sa.func.now())


@functools.cache
def _claim() -> sa.Select[Any]:
    now = _p("now", UTCDateTime())
    claimed = (
        sa.update(RUNS)
        .where(
            RUNS.c.id == sa.bindparam("run_id"),
            RUNS.c.saga_id == sa.bindparam("saga_id"),
            RUNS.c.status == StepStatus.SCHEDULED.value,
            SAGAS.c.id == RUNS.c.saga_id,
            # an early or duplicate message while the saga waits in Postgres (a durable
            # backoff, an approval, a rollback waiting for its compensation's backoff)
            SAGAS.c.state != SagaState.WAITING.value,
            SAGAS.c.state != SagaState.AWAITING_APPROVAL.value,
            sa.or_(SAGAS.c.wake_at.is_(None), SAGAS.c.wake_at <= _db_now()),
        )
        .values(
            status=StepStatus.RUNNING.value,
            worker=sa.bindparam("worker"),
            task_id=sa.bindparam("task_id"),
            started_at=_db_now(),
            lease_expires_at=_db_now() + sa.func.make_interval(
                0, 0, 0, 0, 0, 0, sa.cast(sa.bindparam("lease"), sa.Float())),
            deliveries=RUNS.c.deliveries + 1,
        )
        .returning(*RUNS.c, *(c.label(f"saga__{c.name}") for c in SAGAS.c))
        .cte("claimed")
    )
    gone = sa.delete(OUTBOX).where(OUTBOX.c.step_run_id.in_(sa.select(claimed.c.id))).cte("gone")
    started = (
        sa.update(SAGAS)
        .where(
            SAGAS.c.id == sa.bindparam("saga_id"),
            SAGAS.c.state == SagaState.PENDING.value,
            sa.exists(sa.select(claimed.c.id)),
        )
        .values(state=sa.bindparam("started_state"), updated_at=now)
        .returning(SAGAS.c.id)
        .cte("started")
    )
    kind = sa.case(
        (claimed.c.direction == Direction.FORWARD.value, "step.claimed"),
        else_="compensation.claimed",
    )
    claim_event = sa.select(
        claimed.c.saga_id, now, kind, claimed.c.step, claimed.c.id, _p("worker"),
        _p("task_id"),
        sa.func.concat(sa.literal("attempt "), claimed.c.attempt, sa.literal(", delivery "),
                       claimed.c.deliveries),
        sa.func.jsonb_build_object(sa.literal("attempt"), claimed.c.attempt,
                                   sa.literal("level"), claimed.c.level, sa.literal("tier"),
                                   claimed.c.tier),
    )
    start_event = sa.select(
        started.c.id, now, _p("started_kind"), sa.null(), sa.null(), _p("worker"),
        _p("task_id"), _p("started_message"),
        sa.func.jsonb_build_object(sa.literal("from"), sa.literal("pending"), sa.literal("to"),
                                   _p("started_state"), sa.literal("trigger"),
                                   sa.literal("start")),
    )
    events = (
        sa.insert(EVENTS)
        .from_select(EVENT_COLUMNS, sa.union_all(start_event, claim_event),
                     include_defaults=False)
        .cte("events")
    )
    # "*": the column list again would push the statement past psycopg's 4 KB cache of
    # parsed (and prepared) statements; psycopg returns aware datetimes and parsed JSON.
    return (
        sa.select(sa.literal_column("*"))
        .select_from(claimed)
        .add_cte(gone)
        .add_cte(started)
        .add_cte(events)
    )


def claim(
    db: Database, saga_id: str, run_id: int, *, worker: str, task_id: str | None, lease: float
) -> Claim:
    """Mark a scheduled run RUNNING under a lease, and commit, before the action runs."""
    started = next_state("*", SagaState.PENDING, "start")  # the table decides, not the SQL

    def attempt() -> dict[str, Any] | None:
        now = db.clock()
        with db.write(Write.CLAIM, autocommit=True) as conn:
            cur = run_compiled(conn, _claim, {
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
    run = step_run_record(_Row({c.name: m[c.name] for c in RUNS.c}))
    saga = saga_record(_Row({c.name: m[f"saga__{c.name}"] for c in SAGAS.c}))
    if saga.state is SagaState.PENDING:
        saga = replace(saga, state=started)
    if run.direction is Direction.FORWARD and run.attempt <= 1:
        return Claim(ClaimStatus.CLAIMED, run, saga)  # nothing more to read
    with db.read() as conn:
        forward_result = None
        if run.direction is Direction.COMPENSATE:  # the result of the step it undoes
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
            errors = tuple(r.error for r in _round(conn, run) if r.error)
    return Claim(ClaimStatus.CLAIMED, run, saga, forward_result, errors)


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
