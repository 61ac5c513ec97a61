from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


@upgrade_table.register(index=4, description="Mail held until its reader has a device; size kept")
async def upgrade_v5(conn: Connection) -> None:
    # The raw column is now sealed, so its length is no longer the mail's size: keep it
    # beside it for the per-mailbox quota of held mail.
    await conn.execute("ALTER TABLE inbound_message ADD COLUMN size BIGINT NOT NULL DEFAULT 0")
    await conn.execute("UPDATE inbound_message SET size = LENGTH(raw)")
    # When a delivery became deliverable: its arrival, or the moment its held mail was released.
    # The give-up clock runs from here, so mail that waited weeks for a first login still gets
    # its full retry time.
    await conn.execute(
        "ALTER TABLE inbound_delivery ADD COLUMN due_since BIGINT NOT NULL DEFAULT 0"
    )
    await conn.execute(
        "UPDATE inbound_delivery SET due_since = (SELECT received_at FROM inbound_message m "
        "WHERE m.id = inbound_delivery.message_id)"
    )
