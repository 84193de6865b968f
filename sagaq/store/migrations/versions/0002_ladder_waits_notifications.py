"""ladder rungs on step runs, durable waits, incidents and notifications

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)
WAITING = sa.text("state = 'waiting'")


def upgrade() -> None:
    with op.batch_alter_table("sagaq_step_runs") as t:
        t.add_column(sa.Column("level", sa.Integer(), nullable=False, server_default="0"))
        t.add_column(sa.Column("tier", sa.String(100), nullable=True))
        t.add_column(sa.Column("failure", sa.String(32), nullable=True))
    with op.batch_alter_table("sagaq_sagas") as t:
        t.add_column(sa.Column("incident", sa.Integer(), nullable=False, server_default="0"))
        t.add_column(sa.Column("wake_at", When, nullable=True))
    op.create_index(
        "ix_sagaq_sagas_wake_at",
        "sagaq_sagas",
        ["wake_at"],
        postgresql_where=WAITING,
        sqlite_where=WAITING,
    )
    with op.batch_alter_table("sagaq_outbox") as t:
        t.add_column(sa.Column("notification_id", BigId, nullable=True))
        t.create_unique_constraint("uq_sagaq_outbox_notification_id", ["notification_id"])
    op.create_table(
        "sagaq_notifications",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("incident", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("dedup_key", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.Column("sent_at", When, nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagaq_sagas.id"],
            name="fk_sagaq_notifications_saga_id_sagaq_sagas",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_notifications"),
        sa.UniqueConstraint(
            "saga_id", "incident", "channel", "kind", "action", name="uq_sagaq_notifications_once"
        ),
    )
    op.create_index("ix_sagaq_notifications_saga_id", "sagaq_notifications", ["saga_id", "id"])


def downgrade() -> None:
    op.drop_table("sagaq_notifications")
    with op.batch_alter_table("sagaq_outbox") as t:
        t.drop_constraint("uq_sagaq_outbox_notification_id", type_="unique")
        t.drop_column("notification_id")
    op.drop_index("ix_sagaq_sagas_wake_at", table_name="sagaq_sagas")
    with op.batch_alter_table("sagaq_sagas") as t:
        t.drop_column("wake_at")
        t.drop_column("incident")
    with op.batch_alter_table("sagaq_step_runs") as t:
        t.drop_column("failure")
        t.drop_column("tier")
        t.drop_column("level")
