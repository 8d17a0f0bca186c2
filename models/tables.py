"""The ledger schema. Alembic migrations in ``models/migrations`` are the only way it is made.

Times are integer milliseconds since the Unix epoch: one representation on SQLite and
PostgreSQL, no time-zone conversions on the hot path.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, MetaData, String, Table, Text

metadata = MetaData()

# One row per user: the head of the user's event stream. Allocating ``seq`` by
# bumping this row serialises a user's writers, so seq order is commit order and
# seq is contiguous per user (nodes use that to detect a lost live message).
streams = Table(
    "streams",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("last_seq", BigInteger, nullable=False),
    # The highest seq deleted by retention: a device resuming below it missed events.
    Column("pruned_seq", BigInteger, nullable=False, server_default="0"),
)

events = Table(
    "events",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(200), nullable=False),
    Column("device_id", String(128), nullable=True),
    Column("kind", String(64), nullable=False),
    Column("data", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),
    Column("collapse", String(200), nullable=True),
    Column("superseded_by", BigInteger, nullable=True),
    # SHA-256 of the content: a reused id with other content is a conflict, not a duplicate.
    Column("digest", String(64), nullable=True),
    Index("events_id_key", "id", unique=True),
    Index("events_user_collapse_idx", "user_id", "collapse"),
    Index("events_created_at_idx", "created_at"),
)

# Delivery state per device is two cursors, not a row per (event, device).
devices = Table(
    "devices",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("acked_seq", BigInteger, nullable=False, server_default="0"),
    Column("sent_seq", BigInteger, nullable=False, server_default="0"),
    Column("created_at", BigInteger, nullable=False),
    Column("last_seen", BigInteger, nullable=False),
    Index("devices_last_seen_idx", "last_seen"),
)

# Superseded events that a device never received. Backfill skips superseded events, so a
# device's cursors pass them without their being sent; each backfill records the ones it
# passed over here, for their delivery status. ``created_at`` is the event's, so
# retention deletes these rows with their events.
skipped = Table(
    "skipped",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("created_at", BigInteger, nullable=False),
    Index("skipped_created_at_idx", "created_at"),
)
