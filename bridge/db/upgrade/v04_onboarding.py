from __future__ import annotations

from mautrix.util.async_db import Connection

from . import upgrade_table


@upgrade_table.register(description="Onboarding: welcomed users, checkups, guard opt-outs")
async def upgrade_v4(conn: Connection) -> None:
    # One row per local user the bridge has met: when it greeted them, in which DM, whether they
    # opted out of unsolicited messages, and when it last nudged them.
    await conn.execute("""
        CREATE TABLE local_user (
            user_id        TEXT PRIMARY KEY,
            welcomed_at    BIGINT,
            dm_room_id     TEXT,
            checkup_off    BOOLEAN NOT NULL DEFAULT false,
            last_nudge_at  BIGINT,
            known_devices  TEXT NOT NULL DEFAULT ''
        )
    """)
    # Rooms whose members asked the encryption guard to leave them alone.
    await conn.execute("""
        CREATE TABLE guard_ignored_room (
            room_id    TEXT PRIMARY KEY,
            ignored_by TEXT NOT NULL,
            ignored_at BIGINT NOT NULL
        )
    """)
    # Rooms the guard already handled (encrypted, or found public), so it speaks once per room.
    await conn.execute("""
        CREATE TABLE guard_seen_room (
            room_id TEXT PRIMARY KEY,
            outcome TEXT NOT NULL,
            seen_at BIGINT NOT NULL
        )
    """)
