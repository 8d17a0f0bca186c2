"""The migrations make exactly the schema that models/tables.py describes, on both ledgers."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from models.ledger import Ledger, head_revision
from models.tables import metadata


async def test_migrated_schema_matches_the_models(ledger: Ledger) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        context = MigrationContext.configure(sync_conn)
        return list(compare_metadata(context, metadata))

    async with ledger.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    assert await ledger.schema_revision() == head_revision()
