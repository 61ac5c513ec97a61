from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


@upgrade_table.register(description="Bridge state and processed appservice transactions")
async def upgrade_v1(conn: Connection) -> None:
    # Small facts the bridge must remember across restarts (e.g. the bot's recovery key).
    await conn.execute("""
        CREATE TABLE bridge_state (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )
    """)
    # Synapse resends a transaction until it gets a 200; remembering the ids we finished makes a
    # replay after a restart a no-op instead of a second delivery.
    await conn.execute("""
        CREATE TABLE appservice_txn (
            txn_id       TEXT PRIMARY KEY,
            processed_at BIGINT NOT NULL
        )
    """)
