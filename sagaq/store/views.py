"""Read operations: what ``sagaq ls`` / ``show`` and the tests look at."""

from __future__ import annotations

import sqlalchemy as sa

from sagaq.machine import SagaState
from sagaq.store.models import EVENTS, OUTBOX, RUNS, SAGAS
from sagaq.store.records import EventRecord, SagaRecord, StepRunRecord
from sagaq.store.timeline import event_record, saga_record, step_run_record


class Views:
    engine: sa.Engine

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(SAGAS).where(SAGAS.c.id == saga_id)).first()
        return saga_record(row) if row is not None else None

    def find_sagas(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids that start with ``prefix`` (operators type short ids)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(SAGAS.c.id).where(SAGAS.c.id.startswith(prefix, autoescape=True))
                    .limit(limit)
                ).scalars()
            )

    def list_sagas(
        self,
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
        with self.engine.connect() as conn:
            return [saga_record(r) for r in conn.execute(query)]

    def step_runs(self, saga_id: str) -> list[StepRunRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(RUNS).where(RUNS.c.saga_id == saga_id).order_by(RUNS.c.id)
            )
            return [step_run_record(r) for r in rows]

    def events(self, saga_id: str) -> list[EventRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(EVENTS).where(EVENTS.c.saga_id == saga_id).order_by(EVENTS.c.id)
            )
            return [event_record(r) for r in rows]

    def count_outbox(self, saga_id: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(OUTBOX)
        if saga_id is not None:
            query = query.where(OUTBOX.c.saga_id == saga_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
