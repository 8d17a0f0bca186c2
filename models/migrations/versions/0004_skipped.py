"""skipped: superseded events a device never received

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "skipped",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("skipped_created_at_idx", "skipped", ["created_at"])


def downgrade() -> None:
    op.drop_index("skipped_created_at_idx", table_name="skipped")
    op.drop_table("skipped")
