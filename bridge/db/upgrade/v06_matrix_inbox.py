from __future__ import annotations

from mautrix.util.async_db import Connection, Scheme

from . import upgrade_table


# Version 6 whatever else registers before it (v05–v08 are written in parallel; mautrix fills a
# gap with a no-op until the missing one is imported).
@upgrade_table.register(index=5, description="Matrix inbox: events recorded before the ack")
async def upgrade_v6(conn: Connection, scheme: Scheme) -> None:
    serial = "INTEGER PRIMARY KEY" if scheme == Scheme.SQLITE else "BIGSERIAL PRIMARY KEY"
    # Events from appservice transactions the bridge must act on (messages, encrypted messages,
    # redactions in rooms the bot is in), still encrypted, recorded before the transaction is
    # answered and deleted once handled. `id` is arrival order; `session_id` is the Megolm
    # session an encrypted event needs; `txn_id` tells rows of an unfinished transaction
    # (Synapse resends those) from rows the bridge owes an answer.
    await conn.execute(f"""
        CREATE TABLE matrix_inbox (
            id           {serial},
            event_id     TEXT NOT NULL UNIQUE,
            room_id      TEXT NOT NULL,
            sender       TEXT NOT NULL,
            session_id   TEXT,
            txn_id       TEXT NOT NULL,
            raw          TEXT NOT NULL,
            received_at  BIGINT NOT NULL,
            attempts     INTEGER NOT NULL DEFAULT 0,
            next_try_at  BIGINT NOT NULL DEFAULT 0
        )
    """)
    await conn.execute("CREATE INDEX matrix_inbox_room ON matrix_inbox (room_id, id)")
    # Events already handled, by ID only (the event itself is gone with its row): a homeserver
    # that sends an event again under a new transaction id must not have it handled twice.
    # Pruned after the transaction log's retention.
    await conn.execute("""
        CREATE TABLE matrix_inbox_done (
            event_id TEXT PRIMARY KEY,
            done_at  BIGINT NOT NULL
        )
    """)
    await conn.execute("CREATE INDEX matrix_inbox_done_at ON matrix_inbox_done (done_at)")
