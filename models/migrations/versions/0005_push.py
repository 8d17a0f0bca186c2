"""push: registrations, events.push_at/notification, push decisions and the scan mark

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("push_at", sa.BigInteger, nullable=True))
        batch.add_column(sa.Column("notification", sa.Text, nullable=True))
    op.create_index("events_push_at_idx", "events", ["push_at"])
    op.create_table(
        "push_registrations",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("token", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "pushes",
        sa.Column("user_id", sa.String(128), primary_key=True),
        sa.Column("device_id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_at", sa.BigInteger, nullable=False),
        sa.Column("claimed_until", sa.BigInteger, nullable=True),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("decided_at", sa.BigInteger, nullable=False),
        sa.Column("done_at", sa.BigInteger, nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("carried_by", sa.BigInteger, nullable=True),
        sa.Column("created_at", sa.BigInteger, nullable=False),
    )
    op.create_index("pushes_state_next_idx", "pushes", ["state", "next_at"])
    op.create_index("pushes_created_at_idx", "pushes", ["created_at"])
    op.create_table(
        "push_scan",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("scanned_to", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO push_scan (id, scanned_to) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("push_scan")
    op.drop_index("pushes_created_at_idx", table_name="pushes")
    op.drop_index("pushes_state_next_idx", table_name="pushes")
    op.drop_table("pushes")
    op.drop_table("push_registrations")
    op.drop_index("events_push_at_idx", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("notification")
        batch.drop_column("push_at")
