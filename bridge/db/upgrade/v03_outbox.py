from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


@upgrade_table.register(description="Outbox for mail written in Matrix; reply targets per mail")
async def upgrade_v3(conn: Connection, scheme: Scheme) -> None:
    blob = "BYTEA" if scheme != Scheme.SQLITE else "BLOB"
    # Keyed by the Matrix event: a redelivered event can never be mailed twice. The raw mail is
    # cleared once sent; the row stays for that guarantee and for the sending rate limit.
    await conn.execute(f"""
        CREATE TABLE outbox (
            event_id     TEXT PRIMARY KEY,
            room_id      TEXT NOT NULL,
            owner        TEXT NOT NULL,
            thread_root  TEXT NOT NULL,
            message_id   TEXT NOT NULL,
            mail_from    TEXT NOT NULL,
            recipients   TEXT NOT NULL,
            raw          {blob} NOT NULL,
            state        TEXT NOT NULL DEFAULT 'pending',
            attempts     INTEGER NOT NULL DEFAULT 0,
            next_attempt BIGINT NOT NULL,
            created_at   BIGINT NOT NULL,
            last_error   TEXT
        )
    """)
    await conn.execute("CREATE INDEX outbox_due ON outbox (state, next_attempt)")
    await conn.execute("CREATE INDEX outbox_owner ON outbox (owner, created_at)")
    # Who a reply to each mail goes to (Reply-To or From, and the other participants for Cc),
    # and the References chain to continue.
    for column in ("reply_to", "cc", "refs"):
        await conn.execute(
            f"ALTER TABLE mail_message ADD COLUMN {column} TEXT NOT NULL DEFAULT ''"
        )
    await conn.execute(
        "ALTER TABLE mail_message ADD COLUMN created_at BIGINT NOT NULL DEFAULT 0"
    )
    # The subject given with the `new` command, for mail started outside any thread.
    await conn.execute("ALTER TABLE portal ADD COLUMN subject TEXT NOT NULL DEFAULT ''")
