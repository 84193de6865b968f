"""Tables: sagas, step runs, events (the timeline) and the outbox.

PostgreSQL only (the embedded demo runs one too). The indexes that matter for correctness
and cost are partial: one active step run per saga, and "active sagas" indexes that never
touch finished rows.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sagaq.machine import ACTIVE_STEP, FINISHED

_active_steps = "status IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(ACTIVE_STEP)))
_active_sagas = "state NOT IN ({})".format(", ".join(f"'{s.value}'" for s in sorted(FINISHED)))

BigId = sa.BigInteger()
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


class UTCDateTime(sa.TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes: a naive one is refused, not guessed."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = sa.MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class SagaModel(Base):
    __tablename__ = "sagaq_sagas"

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    version: Mapped[str] = mapped_column(sa.String(64))
    state: Mapped[str] = mapped_column(sa.String(32))
    key: Mapped[str | None] = mapped_column(sa.String(255))
    input: Mapped[Any] = mapped_column(Json)
    checkpoint: Mapped[Any] = mapped_column(Json)
    error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Counts escalations to needs_human: one incident, one page (its dedup key).
    incident: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    wake_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # a durable wait ends

    __table_args__ = (
        sa.UniqueConstraint("name", "key", name="uq_sagaq_sagas_name_key"),
        sa.Index(
            "ix_sagaq_sagas_wake_at",
            "wake_at",
            postgresql_where=sa.text("state = 'waiting'"),
        ),
        sa.Index("ix_sagaq_sagas_created_at", "created_at"),
        # Serves "active sagas" (ls --state running, the reconciler) without finished rows.
        sa.Index(
            "ix_sagaq_sagas_active",
            "state",
            "updated_at",
            postgresql_where=sa.text(_active_sagas),
        ),
    )


class StepRunModel(Base):
    __tablename__ = "sagaq_step_runs"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    saga_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("sagaq_sagas.id", ondelete="CASCADE")
    )
    step: Mapped[str] = mapped_column(sa.String(200))
    step_index: Mapped[int] = mapped_column(sa.Integer)
    direction: Mapped[str] = mapped_column(sa.String(16))
    attempt: Mapped[int] = mapped_column(sa.Integer)
    status: Mapped[str] = mapped_column(sa.String(16))
    task_name: Mapped[str] = mapped_column(sa.String(450))
    # The compensation this forward run will need if the saga rolls back: written when the
    # run is scheduled, so it is part of the persisted plan before the action runs.
    compensate_task: Mapped[str | None] = mapped_column(sa.String(450))
    idempotency_key: Mapped[str] = mapped_column(sa.String(64))
    message_id: Mapped[str] = mapped_column(sa.String(64))
    worker: Mapped[str | None] = mapped_column(sa.String(255))
    task_id: Mapped[str | None] = mapped_column(sa.String(255))
    deliveries: Mapped[int] = mapped_column(sa.Integer, default=0)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    result: Mapped[Any] = mapped_column(Json, nullable=True)
    error: Mapped[str | None] = mapped_column(sa.Text)
    error_type: Mapped[str | None] = mapped_column(sa.String(255))
    level: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")  # ladder rung
    tier: Mapped[str | None] = mapped_column(sa.String(100))  # model tier of this attempt
    failure: Mapped[str | None] = mapped_column(sa.String(32))  # failure class, if it failed
    scheduled_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.Index("ix_sagaq_step_runs_saga_id", "saga_id", "id"),
        # DESIGN §4.4: the database itself allows one scheduled-or-running run per saga.
        sa.Index(
            "uq_sagaq_step_runs_one_active",
            "saga_id",
            unique=True,
            postgresql_where=sa.text(_active_steps),
        ),
        sa.Index(
            "ix_sagaq_step_runs_active",
            "status",
            "lease_expires_at",
            postgresql_where=sa.text(_active_steps),
        ),
        # Runs whose unknown outcome is being resolved: the lease sweep reads them too.
        sa.Index(
            "ix_sagaq_step_runs_unresolved",
            "lease_expires_at",
            postgresql_where=sa.text("status = 'unknown' AND finished_at IS NULL"),
        ),
    )


class EventModel(Base):
    __tablename__ = "sagaq_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    saga_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("sagaq_sagas.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    kind: Mapped[str] = mapped_column(sa.String(64))
    step: Mapped[str | None] = mapped_column(sa.String(200))
    step_run_id: Mapped[int | None] = mapped_column(BigId)
    worker: Mapped[str | None] = mapped_column(sa.String(255))
    task_id: Mapped[str | None] = mapped_column(sa.String(255))
    message: Mapped[str] = mapped_column(sa.Text, default="")
    data: Mapped[Any] = mapped_column(Json)

    __table_args__ = (sa.Index("ix_sagaq_events_saga_id", "saga_id", "id"),)


class OutboxModel(Base):
    """Messages to publish. A row lives until its step run is claimed (or it is delivered)."""

    __tablename__ = "sagaq_outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    saga_id: Mapped[str | None] = mapped_column(
        sa.String(36), sa.ForeignKey("sagaq_sagas.id", ondelete="CASCADE")
    )
    step_run_id: Mapped[int | None] = mapped_column(BigId, unique=True)
    notification_id: Mapped[int | None] = mapped_column(BigId, unique=True)
    resource_id: Mapped[int | None] = mapped_column(BigId, unique=True)
    task_name: Mapped[str] = mapped_column(sa.String(450))
    args: Mapped[Any] = mapped_column(Json)
    message_id: Mapped[str] = mapped_column(sa.String(64))
    available_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The reconciler re-publishes a row whose message seems lost, backing off each time.
    republished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    republished: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")

    __table_args__ = (sa.Index("ix_sagaq_outbox_available_at", "available_at"),)


class NotificationModel(Base):
    """A page or notice for one channel; delivered by its own task, through the outbox."""

    __tablename__ = "sagaq_notifications"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    saga_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("sagaq_sagas.id", ondelete="CASCADE")
    )
    incident: Mapped[int] = mapped_column(sa.Integer)
    channel: Mapped[str] = mapped_column(sa.String(64))
    kind: Mapped[str] = mapped_column(sa.String(16))  # page | notify
    action: Mapped[str] = mapped_column(sa.String(16))  # trigger | resolve
    # What it is about, beyond the incident: "" for pages, "approval:<id>" for a request.
    subject: Mapped[str] = mapped_column(sa.String(100), default="", server_default="")
    dedup_key: Mapped[str] = mapped_column(sa.String(255))
    status: Mapped[str] = mapped_column(sa.String(16))  # pending | sent | failed
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    note: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.UniqueConstraint(
            "saga_id", "incident", "channel", "kind", "action", "subject",
            name="uq_sagaq_notifications_once",
        ),
        sa.Index("ix_sagaq_notifications_saga_id", "saga_id", "id"),
    )


class ResourceModel(Base):
    """An external resource a step created (``ctx.resource``), released if orphaned."""

    __tablename__ = "sagaq_resources"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    saga_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("sagaq_sagas.id", ondelete="CASCADE")
    )
    step: Mapped[str] = mapped_column(sa.String(200))
    step_run_id: Mapped[int | None] = mapped_column(BigId)
    kind: Mapped[str] = mapped_column(sa.String(100))
    external_id: Mapped[str] = mapped_column(sa.String(255))
    # held → released (its step was compensated) | orphaned (the saga ended without undoing
    # it) → releasing → released | failed (paged)
    status: Mapped[str] = mapped_column(sa.String(16))
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0, server_default="0")
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        sa.UniqueConstraint("saga_id", "kind", "external_id", name="uq_sagaq_resources_once"),
        sa.Index(
            "ix_sagaq_resources_orphaned",
            "updated_at",
            postgresql_where=sa.text("status = 'orphaned'"),
        ),
    )


class ApprovalModel(Base):
    """A durable request for a human decision on one dispatch, asked once."""

    __tablename__ = "sagaq_approvals"

    # Derived from (saga, step, direction, rule): asking again finds the same request.
    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    saga_id: Mapped[str] = mapped_column(
        sa.String(36), sa.ForeignKey("sagaq_sagas.id", ondelete="CASCADE")
    )
    step: Mapped[str] = mapped_column(sa.String(200))
    direction: Mapped[str] = mapped_column(sa.String(16))
    step_run_id: Mapped[int | None] = mapped_column(BigId)
    rule_id: Mapped[str] = mapped_column(sa.String(200))
    rule_fingerprint: Mapped[str] = mapped_column(sa.String(32))
    policy_version: Mapped[str] = mapped_column(sa.String(64))  # when it was requested
    status: Mapped[str] = mapped_column(sa.String(16))  # pending | approved | denied
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    requested_at: Mapped[datetime] = mapped_column(UTCDateTime)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    decided_by: Mapped[str | None] = mapped_column(sa.String(200))
    decided_under: Mapped[str | None] = mapped_column(sa.String(64))  # policy version then
    note: Mapped[str | None] = mapped_column(sa.Text)
    # Whose action dispatched the step (a worker, or the operator who retried): so that a
    # policy can one day forbid approving one's own request.
    requested_by: Mapped[str | None] = mapped_column(sa.String(255))

    __table_args__ = (
        sa.Index("ix_sagaq_approvals_saga_id", "saga_id"),
        sa.Index(
            "ix_sagaq_approvals_pending",
            "deadline",
            postgresql_where=sa.text("status = 'pending'"),
        ),
    )


class PolicyFingerprintModel(Base):
    """A policy (and env) a worker loaded: a dispatching process compares its own to it."""

    __tablename__ = "sagaq_policy_fingerprints"

    fingerprint: Mapped[str] = mapped_column(sa.String(200), primary_key=True)
    policy: Mapped[str] = mapped_column(sa.String(64))  # the policy's label, version@digest
    env: Mapped[str] = mapped_column(sa.String(200))
    source: Mapped[str] = mapped_column(sa.Text)  # the file it was read from
    worker: Mapped[str] = mapped_column(sa.String(255))  # the last worker that loaded it
    first_loaded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    loaded_at: Mapped[datetime] = mapped_column(UTCDateTime)


metadata = Base.metadata

# Core tables, for the store's SQL.
SAGAS = cast(sa.Table, SagaModel.__table__)
RUNS = cast(sa.Table, StepRunModel.__table__)
EVENTS = cast(sa.Table, EventModel.__table__)
OUTBOX = cast(sa.Table, OutboxModel.__table__)
NOTIFICATIONS = cast(sa.Table, NotificationModel.__table__)
RESOURCES = cast(sa.Table, ResourceModel.__table__)
APPROVALS = cast(sa.Table, ApprovalModel.__table__)
POLICY_FINGERPRINTS = cast(sa.Table, PolicyFingerprintModel.__table__)
