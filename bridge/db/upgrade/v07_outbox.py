from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


# Version 7 whatever else registers before it (v05–v08 are written in parallel; mautrix fills a
# missing one with a no-op), so this step never changes its number.
@upgrade_table.register(index=6, description="Outbox: Message-ID index for loop detection")
async def upgrade_v7(conn: Connection) -> None:
    # Every inbound mail asks whether its Message-ID is one the bridge generated
    # (Outbox.knows_message_id); the primary key (event_id) cannot serve that.
    await conn.execute("CREATE INDEX outbox_message_id ON outbox (message_id)")
    # The raw column holds sealed mail from now on (bridge.portal.outbox); rows queued before
    # stay plain text, which the sealing's marker tells apart, so nothing is rewritten here.
