"""partial indexes: events by collapse key and by push time index only the events that have one

Most events carry neither a collapse key nor a push time, and every index entry is work
for each insert. The queries that use these indexes compare the column (``collapse =``,
``push_at <=``), which implies it is not null, so both PostgreSQL and SQLite use the
partial indexes for them.

On PostgreSQL the new indexes are built concurrently (writes go on while they build) and
the old ones dropped after; on SQLite the indexes are rebuilt in place.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_INDEXES = (
    ("events_user_collapse_idx", ["user_id", "collapse"], "collapse IS NOT NULL"),
    ("events_push_at_idx", ["push_at"], "push_at IS NOT NULL"),
)


def _rebuild(partial: bool) -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    for name, columns, where in _INDEXES:
        condition = {"postgresql_where": sa.text(where), "sqlite_where": sa.text(where)}
        if not postgres:
            op.drop_index(name, table_name="events")
            op.create_index(name, "events", columns, **(condition if partial else {}))
            continue
        # Built beside the old index without blocking writes, then swapped in by name.
        with op.get_context().autocommit_block():
            op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}_new")
            op.create_index(
                f"{name}_new",
                "events",
                columns,
                postgresql_concurrently=True,
                **(condition if partial else {}),
            )
        op.drop_index(name, table_name="events")
        op.execute(f"ALTER INDEX {name}_new RENAME TO {name}")


def upgrade() -> None:
    _rebuild(partial=True)


def downgrade() -> None:
    _rebuild(partial=False)
