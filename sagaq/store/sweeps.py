"""Reconciler sweeps: small, bounded, idempotent batches over active rows only."""

from __future__ import annotations

import sqlalchemy as sa

from sagaq.machine import SagaState, StepStatus
from sagaq.store.base import StoreBase
from sagaq.store.models import OUTBOX, RUNS, SAGAS
from sagaq.store.records import Dispatch, SagaRecord
from sagaq.store.timeline import Timeline, saga_record


class Sweeps(StoreBase):
    def wake_due(self, batch: int = 100) -> list[Dispatch]:
        """Sagas whose durable wait is over: waiting → running, and their message out."""
        now = self.clock()
        dispatches: list[Dispatch] = []
        with self.engine.begin() as conn:
            rows = conn.execute(
                sa.select(SAGAS)
                .where(SAGAS.c.state == SagaState.WAITING.value, SAGAS.c.wake_at <= now)
                .order_by(SAGAS.c.wake_at)
                .limit(batch)
                .with_for_update(skip_locked=True)  # a second beat takes other rows
            ).all()
            for row in rows:
                saga: SagaRecord = saga_record(row)
                tl = Timeline(saga.id, now, worker="reconciler")
                self._transition(conn, saga, "wake", tl)
                due = conn.execute(
                    sa.select(OUTBOX)
                    .join(RUNS, RUNS.c.id == OUTBOX.c.step_run_id)
                    .where(
                        OUTBOX.c.saga_id == saga.id,
                        RUNS.c.status == StepStatus.SCHEDULED.value,
                    )
                ).all()
                dispatches += [
                    Dispatch(r.task_name, (r.args[0], r.args[1]), r.message_id) for r in due
                ]
                tl.flush(conn)
        return dispatches
