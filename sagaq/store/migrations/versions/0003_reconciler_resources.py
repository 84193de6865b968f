"""reconciler: outbox re-publication bookkeeping, external resources for orphan cleanup

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
When = sa.DateTime(timezone=True)
ORPHANED = sa.text("status = 'orphaned'")


def upgrade() -> None:
    with op.batch_alter_table("sagaq_outbox") as t:
        t.add_column(sa.Column("republished_at", When, nullable=True))
        t.add_column(sa.Column("republished", sa.Integer(), nullable=False, server_default="0"))
        t.add_column(sa.Column("resource_id", BigId, nullable=True))
        t.create_unique_constraint("uq_sagaq_outbox_resource_id", ["resource_id"])
    op.create_table(
        "sagaq_resources",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("saga_id", sa.String(36), nullable=False),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("step_run_id", BigId, nullable=True),
        sa.Column("kind", sa.String(100), nullable=False),
        sa.Column("external_id", sa.String(255), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", When, nullable=False),
        sa.Column("updated_at", When, nullable=False),
        sa.Column("released_at", When, nullable=True),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["sagaq_sagas.id"],
            name="fk_sagaq_resources_saga_id_sagaq_sagas",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_sagaq_resources"),
        sa.UniqueConstraint("saga_id", "kind", "external_id", name="uq_sagaq_resources_once"),
    )
    op.create_index(
        "ix_sagaq_resources_orphaned",
        "sagaq_resources",
        ["updated_at"],
        postgresql_where=ORPHANED,
        sqlite_where=ORPHANED,
    )


def downgrade() -> None:
    op.drop_table("sagaq_resources")
    with op.batch_alter_table("sagaq_outbox") as t:
        t.drop_constraint("uq_sagaq_outbox_resource_id", type_="unique")
        t.drop_column("resource_id")
        t.drop_column("republished")
        t.drop_column("republished_at")
