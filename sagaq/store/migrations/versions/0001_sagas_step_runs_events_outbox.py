"""sagas, step runs, events, outbox

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
When = sa.DateTime(timezone=True)
ACTIVE_STEPS = sa.text("status IN ('running', 'scheduled')")
ACTIVE_SAGAS = sa.text("state NOT IN ('compensated', 'completed', 'resolved')")


def upgrade() -> None:
    op.create_table(
        "sagaq_sagas",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("key", sa.String(255), nullable=True),
        sa.Column("input", Json, nullable=False),
        sa.Column("checkpoint", Json, nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.Column("finished_at", When, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_sagas"),
        sa.UniqueConstraint("name", "key", name="uq_sagaq_sagas_name_key"),
    )
    op.create_index("ix_sagaq_sagas_created_at", "sagaq_sagas", ["created_at"])
    op.create_index(
        "ix_sagaq_sagas_active",
        "sagaq_sagas",
        ["state", "updated_at"],
        postgresql_where=ACTIVE_SAGAS,
        sqlite_where=ACTIVE_SAGAS,
    )

    op.create_table(
        "sagaq_step_runs",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("step_index", sa.Integer(), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("task_name", sa.String(450), nullable=False),
        sa.Column("compensate_task", sa.String(450), nullable=True),
        sa.Column("idempotency_key", sa.String(64), nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("task_id", sa.String(255), nullable=True),
        sa.Column("deliveries", sa.Integer(), nullable=False),
        sa.Column("lease_expires_at", When, nullable=True),
        sa.Column("not_before", When, nullable=True),
        sa.Column("result", Json, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_type", sa.String(255), nullable=True),
        sa.Column("scheduled_at", When, nullable=False),
        sa.Column("started_at", When, nullable=True),
        sa.Column("finished_at", When, nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagaq_sagas.id"],
            name="fk_sagaq_step_runs_saga_id_sagaq_sagas",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_step_runs"),
    )
    op.create_index("ix_sagaq_step_runs_saga_id", "sagaq_step_runs", ["saga_id", "id"])
    op.create_index(
        "uq_sagaq_step_runs_one_active",
        "sagaq_step_runs",
        ["saga_id"],
        unique=True,
        postgresql_where=ACTIVE_STEPS,
        sqlite_where=ACTIVE_STEPS,
    )
    op.create_index(
        "ix_sagaq_step_runs_active",
        "sagaq_step_runs",
        ["status", "lease_expires_at"],
        postgresql_where=ACTIVE_STEPS,
        sqlite_where=ACTIVE_STEPS,
    )

    op.create_table(
        "sagaq_events",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("at", When, nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("step", sa.String(200), nullable=True),
        sa.Column("step_run_id", BigId, nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("task_id", sa.String(255), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("data", Json, nullable=False),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagaq_sagas.id"],
            name="fk_sagaq_events_saga_id_sagaq_sagas",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_events"),
    )
    op.create_index("ix_sagaq_events_saga_id", "sagaq_events", ["saga_id", "id"])

    op.create_table(
        "sagaq_outbox",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(36), nullable=True),
        sa.Column("step_run_id", BigId, nullable=True),
        sa.Column("task_name", sa.String(450), nullable=False),
        sa.Column("args", Json, nullable=False),
        sa.Column("message_id", sa.String(64), nullable=False),
        sa.Column("available_at", When, nullable=False),
        sa.Column("created_at", When, nullable=False),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagaq_sagas.id"],
            name="fk_sagaq_outbox_saga_id_sagaq_sagas",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_outbox"),
        sa.UniqueConstraint("step_run_id", name="uq_sagaq_outbox_step_run_id"),
    )
    op.create_index("ix_sagaq_outbox_available_at", "sagaq_outbox", ["available_at"])


def downgrade() -> None:
    op.drop_table("sagaq_outbox")
    op.drop_table("sagaq_events")
    op.drop_table("sagaq_step_runs")
    op.drop_table("sagaq_sagas")
