"""Events of one transaction, written in one statement, and row → record mapping."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from psycopg.types.json import Jsonb

from sagaq.machine import Direction, SagaState, StepStatus
from sagaq.store.models import EventModel
from sagaq.store.records import (
    ApprovalRecord,
    EventRecord,
    NotificationRecord,
    ResourceRecord,
    SagaRecord,
    StepRunRecord,
)
from sagaq.store.sql import execute

EVENT_COLUMNS = ["saga_id", "at", "kind", "step", "step_run_id", "worker", "task_id", "message",
                 "data"]


class Timeline:
    """Collects the events a transaction appends to a saga's timeline."""

    def __init__(
        self,
        saga_id: str,
        now: datetime,
        *,
        worker: str | None = None,
        task_id: str | None = None,
    ) -> None:
        self.saga_id = saga_id
        self.now = now
        self.worker = worker
        self.task_id = task_id
        self.rows: list[dict[str, Any]] = []
        self.entered: SagaState | None = None  # set by a lifecycle transition

    def add(
        self,
        kind: str,
        *,
        step: str | None = None,
        run_id: int | None = None,
        message: str = "",
        data: dict[str, Any] | None = None,
    ) -> None:
        self.rows.append(
            {
                "saga_id": self.saga_id,
                "at": self.now,
                "kind": kind,
                "step": step,
                "step_run_id": run_id,
                "worker": self.worker,
                "task_id": self.task_id,
                "message": message,
                "data": data or {},
            }
        )

    def run_event(
        self, run: StepRunRecord, what: str, message: str = "", data: dict[str, Any] | None = None
    ) -> None:
        prefix = "step" if run.direction is Direction.FORWARD else "compensation"
        self.add(
            f"{prefix}.{what}",
            step=run.step,
            run_id=run.id,
            message=message,
            data={"attempt": run.attempt, **(data or {})},
        )

    def flush(self, conn: sa.Connection) -> None:
        """All the events in one prepared statement, however many there are."""
        if self.rows:
            execute(conn, _INSERT_EVENTS, {"rows": as_jsonb(self.rows)})
            self.rows = []


def as_jsonb(rows: list[dict[str, Any]]) -> Jsonb:
    """Event rows as one JSON parameter (``jsonb_to_recordset`` turns it back into rows)."""
    return Jsonb(rows, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=lambda v: v.isoformat() if isinstance(v, datetime)
                      else str(v))


_INSERT_EVENTS = (
    f"INSERT INTO {EventModel.__tablename__} ({', '.join(EVENT_COLUMNS)}) "
    f"SELECT {', '.join(EVENT_COLUMNS)} FROM jsonb_to_recordset(%(rows)s::jsonb) AS t("
    "saga_id varchar, at timestamptz, kind varchar, step varchar, step_run_id bigint, "
    "worker varchar, task_id varchar, message text, data jsonb)"
)


def _mapping(row: Any) -> Any:
    """A row's columns by name: a SQLAlchemy row, or a mapping (a psycopg row, zipped)."""
    return getattr(row, "_mapping", row)


def saga_record(row: Any) -> SagaRecord:
    m = _mapping(row)
    return SagaRecord(
        id=m["id"],
        name=m["name"],
        version=m["version"],
        state=SagaState(m["state"]),
        key=m["key"],
        input=m["input"],
        checkpoint=m["checkpoint"] or {},
        error=m["error"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        finished_at=m["finished_at"],
        incident=m["incident"],
        wake_at=m["wake_at"],
    )


def step_run_record(row: Any) -> StepRunRecord:
    m = dict(_mapping(row))
    m["direction"] = Direction(m["direction"])
    m["status"] = StepStatus(m["status"])
    return StepRunRecord(**m)


def approval_record(row: Any) -> ApprovalRecord:
    return ApprovalRecord(**dict(row._mapping))


def resource_record(row: Any) -> ResourceRecord:
    return ResourceRecord(**dict(row._mapping))


def notification_record(row: Any) -> NotificationRecord:
    return NotificationRecord(**dict(row._mapping))


def event_record(row: Any) -> EventRecord:
    m = dict(row._mapping)
    m["data"] = m["data"] or {}
    return EventRecord(**m)
