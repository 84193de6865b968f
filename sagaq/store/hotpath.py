"""The two writes every step makes, as one statement each on PostgreSQL.

A claim and the success of a step in the middle of a saga are most of what sagaq writes.
On PostgreSQL each is a single statement of data-modifying CTEs run in autocommit: one
round trip and one commit, with the same guards as the general path (the run must be
``scheduled`` / ``running``, the saga ``running`` and not waiting). When a guard does not
hold the statement changes nothing and returns no row; the caller then takes the general
path, which finds out why and does the right thing. SQLite always takes the general path.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from sagaq.machine import Direction, SagaState, StepStatus, next_state
from sagaq.store.models import EVENTS, OUTBOX, RUNS, SAGAS
from sagaq.store.records import Dispatch, NewRun

_EVENT_COLS = ["saga_id", "at", "kind", "step", "step_run_id", "worker", "task_id", "message",
               "data"]


def _lit(value: Any, type_: Any = None) -> Any:
    return sa.literal(value, type_) if type_ is not None else sa.literal(value)


def _t(value: Any, type_: Any = None) -> Any:
    """A parameter with its type spelled out: variadic functions cannot infer one."""
    if type_ is None:
        type_ = sa.Integer() if isinstance(value, int) else (
            sa.Float() if isinstance(value, float) else sa.Text())
    return sa.cast(sa.literal(value, type_), type_)


def claim_statement(
    saga_id: str, run_id: int, *, worker: str, task_id: str | None, lease: float, now: datetime
) -> sa.Select[Any]:
    """Claim a scheduled run, delete its outbox row, start a pending saga, write events."""
    running = next_state("*", SagaState.PENDING, "start")  # the table decides, not this SQL
    claimed = (
        sa.update(RUNS)
        .where(
            RUNS.c.id == run_id,
            RUNS.c.saga_id == saga_id,
            RUNS.c.status == StepStatus.SCHEDULED.value,
            SAGAS.c.id == RUNS.c.saga_id,
            SAGAS.c.state.not_in([SagaState.WAITING.value, SagaState.AWAITING_APPROVAL.value]),
        )
        .values(
            status=StepStatus.RUNNING.value,
            worker=worker,
            task_id=task_id,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease),
            deliveries=RUNS.c.deliveries + 1,
        )
        .returning(*RUNS.c, *(c.label(f"saga__{c.name}") for c in SAGAS.c))
        .cte("claimed")
    )
    gone = (
        sa.delete(OUTBOX)
        .where(OUTBOX.c.step_run_id.in_(sa.select(claimed.c.id)))
        .cte("gone")
    )
    started = (
        sa.update(SAGAS)
        .where(
            SAGAS.c.id == saga_id,
            SAGAS.c.state == SagaState.PENDING.value,
            sa.exists(sa.select(claimed.c.id)),
        )
        .values(state=running.value, updated_at=now)
        .returning(SAGAS.c.id)
        .cte("started")
    )
    prefix = sa.case(
        (claimed.c.direction == Direction.FORWARD.value, "step.claimed"),
        else_="compensation.claimed",
    )
    claim_event = sa.select(
        _lit(saga_id), _lit(now, SAGAS.c.updated_at.type), prefix, claimed.c.step, claimed.c.id,
        _lit(worker), _lit(task_id, sa.String()),
        sa.func.concat(_t("attempt "), claimed.c.attempt, _t(", delivery "),
                       claimed.c.deliveries),
        sa.func.jsonb_build_object(_t("attempt"), claimed.c.attempt, _t("level"),
                                   claimed.c.level, _t("tier"), claimed.c.tier),
    )
    start_event = sa.select(
        _lit(saga_id), _lit(now, SAGAS.c.updated_at.type), _lit(f"saga.{running.value}"),
        sa.null(), sa.null(), _lit(worker), _lit(task_id, sa.String()),
        _lit(f"pending → {running.value}"),
        sa.func.jsonb_build_object(_t("from"), _t("pending"), _t("to"), _t(running.value),
                                   _t("trigger"), _t("start")),
    ).select_from(started)
    events = (
        sa.insert(EVENTS)
        .from_select(_EVENT_COLS, sa.union_all(start_event, claim_event), include_defaults=False)
        .cte("events")
    )
    return sa.select(claimed).add_cte(gone).add_cte(started).add_cte(events)


def advance_statement(
    saga_id: str,
    run_id: int,
    *,
    result: Any,
    checkpoint: dict[str, Any],
    new: NewRun,
    worker: str | None,
    task_id: str | None,
    now: datetime,
) -> tuple[sa.Select[Any], Dispatch]:
    """A forward step succeeded and the next one is due: record it all, schedule the next."""
    message_id = str(uuid.uuid4())
    # The saga row is locked first, as on the general path; then either everything below
    # happens or nothing does (a guard failed: the caller takes the general path).
    lock = (
        sa.select(SAGAS.c.id, SAGAS.c.state)
        .where(SAGAS.c.id == saga_id)
        .with_for_update()
        .cte("lock")
    )
    done = (
        sa.update(RUNS)
        .where(
            RUNS.c.id == run_id,
            RUNS.c.status == StepStatus.RUNNING.value,
            sa.exists(sa.select(lock.c.id).where(lock.c.state == SagaState.RUNNING.value)),
        )
        .values(status=StepStatus.SUCCEEDED.value, result=result, finished_at=now,
                lease_expires_at=None)
        .returning(RUNS.c.id, RUNS.c.step, RUNS.c.attempt)
        .cte("done")
    )
    saga = (
        sa.update(SAGAS)
        .where(SAGAS.c.id == saga_id, sa.exists(sa.select(done.c.id)))
        .values(updated_at=now, checkpoint=checkpoint)
        .returning(SAGAS.c.id)
        .cte("saga")
    )
    when = RUNS.c.scheduled_at.type
    nxt = (
        sa.insert(RUNS)
        .from_select(
            ["saga_id", "step", "step_index", "direction", "attempt", "status", "task_name",
             "compensate_task", "idempotency_key", "message_id", "deliveries", "level", "tier",
             "scheduled_at"],
            sa.select(
                _lit(saga_id), _lit(new.step), _lit(new.step_index), _lit(new.direction.value),
                _lit(new.attempt), _lit(StepStatus.SCHEDULED.value), _lit(new.task_name),
                _lit(new.compensate_task, sa.String()), _lit(new.idempotency_key),
                _lit(message_id), _lit(0), _lit(new.level), _lit(new.tier, sa.String()),
                _lit(now, when),
            ).select_from(done),
            include_defaults=False,
        )
        .returning(RUNS.c.id)
        .cte("nxt")
    )
    outbox = (
        sa.insert(OUTBOX)
        .from_select(
            ["saga_id", "step_run_id", "task_name", "args", "message_id", "available_at",
             "created_at"],
            sa.select(
                _lit(saga_id), nxt.c.id, _lit(new.task_name),
                sa.func.jsonb_build_array(_t(saga_id), nxt.c.id), _lit(message_id),
                _lit(now, when), _lit(now, when),
            ),
            include_defaults=False,
        )
        .cte("outbox")
    )
    succeeded = sa.select(
        _lit(saga_id), _lit(now, when), _lit("step.succeeded"), done.c.step, done.c.id,
        _lit(worker, sa.String()), _lit(task_id, sa.String()), _lit(""),
        sa.func.jsonb_build_object(_t("attempt"), done.c.attempt),
    )
    scheduled = sa.select(
        _lit(saga_id), _lit(now, when), _lit("step.scheduled"), _lit(new.step), nxt.c.id,
        _lit(worker, sa.String()), _lit(task_id, sa.String()),
        _lit(new.reason or f"attempt {new.attempt}"),
        sa.func.jsonb_build_object(_t("attempt"), _t(new.attempt), _t("delay"), _t(0.0),
                                   _t("level"), _t(new.level), _t("tier"),
                                   _t(new.tier, sa.Text())),
    )
    events = (
        sa.insert(EVENTS)
        .from_select(_EVENT_COLS, sa.union_all(succeeded, scheduled), include_defaults=False)
        .cte("events")
    )
    stmt = sa.select(nxt.c.id).add_cte(saga).add_cte(outbox).add_cte(events)
    return stmt, Dispatch(new.task_name, (saga_id, 0), message_id, 0.0)
