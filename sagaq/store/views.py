"""Read operations: what ``sagaq ls`` / ``show``, the engine and the tests look at."""

from __future__ import annotations

import sqlalchemy as sa

from sagaq.errors import UnknownSagaError
from sagaq.machine import SagaState
from sagaq.store.db import Database
from sagaq.store.dispatch import uncompensated_query
from sagaq.store.models import EVENTS, OUTBOX, RUNS, SAGAS
from sagaq.store.records import EventRecord, SagaRecord, StepRunRecord
from sagaq.store.timeline import event_record, saga_record, step_run_record


def get_saga(db: Database, saga_id: str) -> SagaRecord | None:
    with db.read() as conn:
        row = conn.execute(sa.select(SAGAS).where(SAGAS.c.id == saga_id)).first()
    return saga_record(row) if row is not None else None


def get_saga_or_raise(db: Database, saga_id: str) -> SagaRecord:
    saga = get_saga(db, saga_id)
    if saga is None:
        raise UnknownSagaError(f"no saga with id {saga_id!r}", saga_id=saga_id)
    return saga


def find_sagas(db: Database, prefix: str, limit: int = 2) -> list[str]:
    """Ids that start with ``prefix`` (operators type short ids)."""
    with db.read() as conn:
        return list(
            conn.execute(
                sa.select(SAGAS.c.id).where(SAGAS.c.id.startswith(prefix, autoescape=True))
                .limit(limit)
            ).scalars()
        )


def list_sagas(
    db: Database,
    *,
    state: SagaState | None = None,
    name: str | None = None,
    limit: int = 50,
) -> list[SagaRecord]:
    query = sa.select(SAGAS).order_by(SAGAS.c.created_at.desc(), SAGAS.c.id).limit(limit)
    if state is not None:
        query = query.where(SAGAS.c.state == state.value)
    if name is not None:
        query = query.where(SAGAS.c.name == name)
    with db.read() as conn:
        return [saga_record(r) for r in conn.execute(query)]


def step_runs(db: Database, saga_id: str) -> list[StepRunRecord]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(RUNS).where(RUNS.c.saga_id == saga_id).order_by(RUNS.c.id)
        )
        return [step_run_record(r) for r in rows]


def events(db: Database, saga_id: str) -> list[EventRecord]:
    with db.read() as conn:
        rows = conn.execute(
            sa.select(EVENTS).where(EVENTS.c.saga_id == saga_id).order_by(EVENTS.c.id)
        )
        return [event_record(r) for r in rows]


def count_outbox(db: Database, saga_id: str | None = None) -> int:
    query = sa.select(sa.func.count()).select_from(OUTBOX)
    if saga_id is not None:
        query = query.where(OUTBOX.c.saga_id == saga_id)
    with db.read() as conn:
        return int(conn.execute(query).scalar_one())


def uncompensated(db: Database, saga_id: str) -> list[str]:
    """Steps whose effect stands and whose compensation has not run, last done first."""
    with db.read() as conn:
        found = conn.execute(uncompensated_query(saga_id))
        return list(dict.fromkeys(r.step for r in found))
