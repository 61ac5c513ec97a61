from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


@upgrade_table.register(description="Inbound mail queue, portals, ghosts, Message-ID map")
async def upgrade_v2(conn: Connection, scheme: Scheme) -> None:
    blob = "BYTEA" if scheme != Scheme.SQLITE else "BLOB"
    # One row per accepted message; `raw` is the message exactly as received. The row (and with
    # it the raw text) is deleted once every recipient's delivery has finished.
    await conn.execute(f"""
        CREATE TABLE inbound_message (
            id          TEXT PRIMARY KEY,
            seq         BIGINT NOT NULL,
            order_key   TEXT NOT NULL DEFAULT '',
            received_at BIGINT NOT NULL,
            mail_from   TEXT NOT NULL,
            peer        TEXT NOT NULL,
            helo        TEXT NOT NULL,
            auth        TEXT,
            raw         {blob} NOT NULL
        )
    """)
    # One row per (message, local recipient): each is delivered, retried and finished on its own.
    await conn.execute("""
        CREATE TABLE inbound_delivery (
            message_id   TEXT NOT NULL REFERENCES inbound_message(id) ON DELETE CASCADE,
            user_id      TEXT NOT NULL,
            recipient    TEXT NOT NULL,
            tag          TEXT NOT NULL DEFAULT '',
            state        TEXT NOT NULL DEFAULT 'pending',
            attempts     INTEGER NOT NULL DEFAULT 0,
            next_attempt BIGINT NOT NULL,
            last_error   TEXT,
            PRIMARY KEY (message_id, user_id)
        )
    """)
    await conn.execute(
        "CREATE INDEX inbound_delivery_due ON inbound_delivery (state, next_attempt)"
    )
    await conn.execute("CREATE INDEX inbound_delivery_user ON inbound_delivery (user_id, state)")
    # Events already sent for a delivery, by part index: a retry skips them instead of posting
    # them twice (the homeserver's own transaction-id dedup only lasts so long).
    await conn.execute("""
        CREATE TABLE delivered_part (
            message_id TEXT NOT NULL,
            user_id    TEXT NOT NULL,
            part       INTEGER NOT NULL,
            event_id   TEXT NOT NULL,
            PRIMARY KEY (message_id, user_id, part),
            FOREIGN KEY (message_id, user_id)
                REFERENCES inbound_delivery(message_id, user_id) ON DELETE CASCADE
        )
    """)
    # A portal is one conversation of one local user: a correspondent, a group, or a list.
    await conn.execute("""
        CREATE TABLE portal (
            id           TEXT PRIMARY KEY,
            owner        TEXT NOT NULL,
            conv_key     TEXT NOT NULL,
            kind         TEXT NOT NULL,
            room_id      TEXT UNIQUE,
            name         TEXT NOT NULL,
            participants TEXT NOT NULL,
            UNIQUE (owner, conv_key)
        )
    """)
    await conn.execute("""
        CREATE TABLE ghost (
            user_id     TEXT PRIMARY KEY,
            address     TEXT NOT NULL,
            displayname TEXT NOT NULL DEFAULT ''
        )
    """)
    # Message-ID ↔ event, per room: how replies find their thread (from email and from Matrix).
    await conn.execute("""
        CREATE TABLE mail_message (
            room_id     TEXT NOT NULL,
            message_id  TEXT NOT NULL,
            event_id    TEXT NOT NULL,
            thread_root TEXT NOT NULL,
            subject     TEXT NOT NULL DEFAULT '',
            PRIMARY KEY (room_id, message_id)
        )
    """)
    await conn.execute("CREATE INDEX mail_message_event ON mail_message (room_id, event_id)")
    # Local users confirmed to exist: their mail is still accepted while the homeserver is down.
    await conn.execute("""
        CREATE TABLE known_mailbox (
            user_id     TEXT PRIMARY KEY,
            verified_at BIGINT NOT NULL
        )
    """)
