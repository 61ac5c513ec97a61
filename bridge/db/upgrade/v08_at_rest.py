from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


# Version 8 whatever else registers before it: v05–v07 are written in parallel, and a missing one
# is filled with a no-op by mautrix, so this step never changes its number.
@upgrade_table.register(index=7, description="Mail metadata sealed at rest; Message-ID index")
async def upgrade_v8(conn: Connection) -> None:
    # Subject, Reply-To, Cc and References of a bridged mail, sealed together with a key derived
    # from encryption.pickle_key (bridge.portal.store). NULL marks a row written before sealing:
    # its plain columns are read until the bridge seals it at start-up (the migration has no key).
    await conn.execute("ALTER TABLE mail_message ADD COLUMN sealed TEXT")
    # The subject given with the `new` command, sealed the same way.
    await conn.execute("ALTER TABLE portal ADD COLUMN sealed_subject TEXT")
    # Every inbound mail looks its In-Reply-To/References up by Message-ID alone (rooms_knowing):
    # the primary key (room_id, message_id) cannot serve that.
    await conn.execute("CREATE INDEX mail_message_message_id ON mail_message (message_id)")
