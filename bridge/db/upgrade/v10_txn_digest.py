from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


@upgrade_table.register(index=9, description="Appservice transactions: keep a digest of the body")
async def upgrade_v10(conn: Connection) -> None:
    # Synapse can reuse a transaction id after a crash; the id alone no longer says "replay".
    await conn.execute("ALTER TABLE appservice_txn ADD COLUMN digest TEXT NOT NULL DEFAULT ''")
