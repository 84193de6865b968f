"""durable approvals for the policy gate; notifications get a subject

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)
PENDING = sa.text("status = 'pending'")


def upgrade() -> None:
    op.create_table(
        "sagaq_approvals",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("step_run_id", BigId, nullable=True),
        sa.Column("rule_id", sa.String(200), nullable=False),
        sa.Column("rule_fingerprint", sa.String(32), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("deadline", When, nullable=False),
        sa.Column("requested_at", When, nullable=False),
        sa.Column("decided_at", When, nullable=True),
        sa.Column("decided_by", sa.String(200), nullable=True),
        sa.Column("decided_under", sa.String(64), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagaq_sagas.id"],
            name="fk_sagaq_approvals_saga_id_sagaq_sagas",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_approvals"),
    )
    op.create_index("ix_sagaq_approvals_saga_id", "sagaq_approvals", ["saga_id"])
    op.create_index(
        "ix_sagaq_approvals_pending",
        "sagaq_approvals",
        ["deadline"],
        postgresql_where=PENDING,
        sqlite_where=PENDING,
    )
    with op.batch_alter_table("sagaq_notifications") as t:
        t.add_column(sa.Column("subject", sa.String(100), nullable=False, server_default=""))
        t.drop_constraint("uq_sagaq_notifications_once", type_="unique")
        t.create_unique_constraint(
            "uq_sagaq_notifications_once",
            ["saga_id", "incident", "channel", "kind", "action", "subject"],
        )


def downgrade() -> None:
    with op.batch_alter_table("sagaq_notifications") as t:
        t.drop_constraint("uq_sagaq_notifications_once", type_="unique")
        t.create_unique_constraint(
            "uq_sagaq_notifications_once", ["saga_id", "incident", "channel", "kind", "action"]
        )
        t.drop_column("subject")
    op.drop_table("sagaq_approvals")
