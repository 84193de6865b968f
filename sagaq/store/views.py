"""Read operations: what ``sagaq ls`` / ``show`` and the tests look at."""

from __future__ import annotations

import sqlalchemy as sa

from sagaq.machine import SagaState
from sagaq.store.models import EventModel, OutboxModel, SagaModel, StepRunModel
from sagaq.store.records import EventRecord, SagaRecord, StepRunRecord
from sagaq.store.timeline import event_record, saga_record, step_run_record

Sagas = SagaModel.__table__
Runs = StepRunModel.__table__
Events = EventModel.__table__
Outbox = OutboxModel.__table__


class Views:
    engine: sa.Engine

    def get_saga(self, saga_id: str) -> SagaRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(Sagas).where(Sagas.c.id == saga_id)).first()
        return saga_record(row) if row is not None else None

    def find_sagas(self, prefix: str, limit: int = 2) -> list[str]:
        """Ids that start with ``prefix`` (operators type short ids)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    sa.select(Sagas.c.id).where(Sagas.c.id.startswith(prefix)).limit(limit)
                ).scalars()
            )

    def list_sagas(
        self,
        *,
        state: SagaState | None = None,
        name: str | None = None,
        limit: int = 50,
    ) -> list[SagaRecord]:
        query = sa.select(Sagas).order_by(Sagas.c.created_at.desc(), Sagas.c.id).limit(limit)
        if state is not None:
            query = query.where(Sagas.c.state == state.value)
        if name is not None:
            query = query.where(Sagas.c.name == name)
        with self.engine.connect() as conn:
            return [saga_record(r) for r in conn.execute(query)]

    def step_runs(self, saga_id: str) -> list[StepRunRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(Runs).where(Runs.c.saga_id == saga_id).order_by(Runs.c.id)
            )
            return [step_run_record(r) for r in rows]

    def events(self, saga_id: str) -> list[EventRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(Events).where(Events.c.saga_id == saga_id).order_by(Events.c.id)
            )
            return [event_record(r) for r in rows]

    def count_outbox(self, saga_id: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(Outbox)
        if saga_id is not None:
            query = query.where(Outbox.c.saga_id == saga_id)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())
