"""an index on runs whose unknown outcome is being resolved (the lease sweep reads them)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

UNRESOLVED = sa.text("status = 'unknown' AND finished_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_sagaq_step_runs_unresolved",
        "sagaq_step_runs",
        ["lease_expires_at"],
        postgresql_where=UNRESOLVED,
        sqlite_where=UNRESOLVED,
    )


def downgrade() -> None:
    op.drop_index("ix_sagaq_step_runs_unresolved", table_name="sagaq_step_runs")
