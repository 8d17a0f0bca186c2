"""The ledger schema. Alembic migrations in ``models/migrations`` are the only way it is made.

Times are integer milliseconds since the Unix epoch: one representation on SQLite and
PostgreSQL, no time-zone conversions on the hot path.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text, text

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
    # When a device that has not acked it gets a platform push (null: never pushed), and
    # the notification (title, body) the publisher gave for that push, as JSON text.
    Column("push_at", BigInteger, nullable=True),
    Column("notification", Text, nullable=True),
    # SHA-256 of the content: a reused id with other content is a conflict, not a duplicate.
    Column("digest", String(64), nullable=True),
    Index("events_id_key", "id", unique=True),
    # Partial: most events have neither a collapse key nor a push time, and the queries
    # that use these compare the column (which implies it is not null).
    Index(
        "events_user_collapse_idx",
        "user_id",
        "collapse",
        postgresql_where=text("collapse IS NOT NULL"),
        sqlite_where=text("collapse IS NOT NULL"),
    ),
    Index("events_created_at_idx", "created_at"),
    Index(
        "events_push_at_idx",
        "push_at",
        postgresql_where=text("push_at IS NOT NULL"),
        sqlite_where=text("push_at IS NOT NULL"),
    ),
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

# A device's push address (one per device): where pushes go while it is not connected.
push_registrations = Table(
    "push_registrations",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("provider", String(32), nullable=False),
    Column("token", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# The push decisions: one row per (event, device) due a push, made once whatever the
# number of nodes (the primary key), then claimed, sent and finished by any node.
# ``state``: due (decided, not sent), sending (claimed until ``claimed_until``), sent,
# skipped (acked, expired or superseded before it was sent; ``reason`` says which),
# failed (the provider refused it, or attempts ran out). ``carried_by``: the seq of the
# event whose push carried this one (events of a device due together go as one push).
pushes = Table(
    "pushes",
    metadata,
    Column("user_id", String(128), primary_key=True),
    Column("device_id", String(128), primary_key=True),
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_at", BigInteger, nullable=False),
    Column("claimed_until", BigInteger, nullable=True),
    Column("claimed_by", String(64), nullable=True),
    Column("decided_at", BigInteger, nullable=False),
    Column("done_at", BigInteger, nullable=True),
    Column("reason", String(64), nullable=True),
    Column("carried_by", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Index("pushes_state_next_idx", "state", "next_at"),
    Index("pushes_created_at_idx", "created_at"),
)

# How far the push decisions have scanned ``events.push_at`` (one row).
push_scan = Table(
    "push_scan",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("scanned_to", BigInteger, nullable=False),
)
