"""the policy each worker loaded (fingerprints); who requested an approval

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

When = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "sagaq_policy_fingerprints",
        sa.Column("fingerprint", sa.String(200), nullable=False),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("env", sa.String(200), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("worker", sa.String(255), nullable=False),
        sa.Column("first_loaded_at", When, nullable=False),
        sa.Column("loaded_at", When, nullable=False),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_sagaq_policy_fingerprints"),
    )
    with op.batch_alter_table("sagaq_approvals") as t:
        t.add_column(sa.Column("requested_by", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sagaq_approvals") as t:
        t.drop_column("requested_by")
    op.drop_table("sagaq_policy_fingerprints")
