from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


@upgrade_table.register(index=8, description="Mail already taken, per user: resends are not posted")
async def upgrade_v9(conn: Connection) -> None:
    # An MTA that lost our 250 (a cut connection after the final dot) sends the same mail again.
    # A keyed digest of the raw mail per recipient recognises it, so it is not posted twice; the
    # rows are forgotten after email.retention_days.
    await conn.execute("""
        CREATE TABLE inbound_seen (
            user_id     TEXT NOT NULL,
            digest      TEXT NOT NULL,
            queue_id    TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            PRIMARY KEY (user_id, digest)
        )
    """)
    await conn.execute("CREATE INDEX inbound_seen_age ON inbound_seen (received_at)")
