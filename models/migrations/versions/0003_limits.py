"""events.digest (a reused id with other content is a conflict) and devices.last_seen index

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


def upgrade() -> None:
    # Events recorded before this revision have no digest: their id matches any content.
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("digest", sa.String(64), nullable=True))
    op.create_index("devices_last_seen_idx", "devices", ["last_seen"])


def downgrade() -> None:
    op.drop_index("devices_last_seen_idx", table_name="devices")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("digest")
