"""Schema upgrades on SQLite and PostgreSQL: an empty database, and every earlier version with
data in it, reach the latest version with nothing lost.

Version N is built by running the bridge's own upgrade table cut after its first N steps, exactly
the code an older release ran; rows are then written in the shape that version wrote them (plain
before sealing existed, sealed after). After the upgrade every row is read back through the
bridge's own APIs, not through SQL: what matters is that the new code can use the old data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from mautrix.util.async_db import Database, UpgradeTable

from bridge.crypto.sealed import seal, seal_bytes
from bridge.db import BridgeState, TxnLog, open_database, upgrade_table
from bridge.email import queue as inbound_queue
from bridge.email.queue import InboundQueue
from bridge.matrix.inbox import InboxStore
from bridge.portal import outbox as outbox_module
from bridge.portal.outbox import Outbox
from bridge.portal.store import (
    MAIL_SEAL_PURPOSE,
    SUBJECT_SEAL_PURPOSE,
    MessageMap,
    PortalStore,
)

LATEST = len(upgrade_table.upgrades)
PICKLE = "migration-test-pickle-key"
OWNER, ROOM, HELD_USER = "@alice:localhost", "!portal:localhost", "@late:localhost"
MAIL_ID, OUT_MID, QUEUED_RAW = "old-mail@example.org", "ours@localhost", b"Subject: old\r\n\r\nhi"
SENT_RAW = b"From: alice@localhost\r\nSubject: Re: old\r\n\r\nreply"
# Ten minutes ago: old enough for every row to be due now.
AGO = int(time.time() * 1000) - 600_000


def _table_up_to(version: int) -> UpgradeTable:
    """The bridge's upgrade table as a release at `version` had it: its first steps only."""
    table = UpgradeTable(version_table_name=upgrade_table.version_table_name,
                         database_name=upgrade_table.database_name,
                         log=logging.getLogger("test.migrations"))
    table.upgrades = upgrade_table.upgrades[:version]
    return table


@asynccontextmanager
async def _database_at(url: str, version: int) -> AsyncIterator[Database]:
    db = Database.create(url, upgrade_table=_table_up_to(version),
                         log=logging.getLogger("test.migrations"))
    await db.start()
    try:
        assert await db.fetchval("SELECT version FROM cloakroom_version") == version
        yield db
    finally:
        await db.stop()


async def _seed_v1(db: Database, version: int) -> None:
    await BridgeState(db).set("bot.recovery_key", "sealed-recovery-key")
    if version >= 10:
        await db.execute("INSERT INTO appservice_txn (txn_id, processed_at, digest) "
                         "VALUES ('txn-old', $1, 'abc')", AGO)
    else:
        await db.execute("INSERT INTO appservice_txn (txn_id, processed_at) VALUES ('txn-old', $1)",
                         AGO)


async def _seed_queue(db: Database, version: int) -> None:
    """One queued mail for OWNER (and, from v5 on, one held for HELD_USER)."""
    sealed = version >= 5  # v5: "the raw column is now sealed"
    raw = seal_bytes(PICKLE, inbound_queue.SEAL_PURPOSE, QUEUED_RAW) if sealed else QUEUED_RAW
    size = ", size" if version >= 5 else ""
    await db.execute(
        "INSERT INTO inbound_message (id, seq, order_key, received_at, mail_from, peer, helo, "
        f"auth, raw{size}) VALUES ('q1', 1, 'bob@example.org', $1, 'bob@example.org', "
        f"'192.0.2.1', 'mx.example.org', $2, $3{', $4' if sealed else ''})",
        AGO, json.dumps({"dmarc": "pass"}), raw, *([len(QUEUED_RAW)] if sealed else []),
    )
    users = [(OWNER, "pending")] + ([(HELD_USER, "held")] if version >= 5 else [])
    for user, state in users:
        extra = (", due_since", ", $4") if version >= 5 else ("", "")
        await db.execute(
            "INSERT INTO inbound_delivery (message_id, user_id, recipient, state, next_attempt"
            f"{extra[0]}) VALUES ('q1', $1, $2, $3, $4{extra[1]})",
            user, user[1:].split(":")[0] + "@localhost", state, AGO,
        )


async def _seed_portal_and_map(db: Database, version: int) -> None:
    """A portal with a `new` subject, and the Message-ID of a mail bridged into it."""
    subject = ("subject", "'New topic'") if 3 <= version < 8 else ("", "")
    if version >= 8:
        subject = ("sealed_subject", f"'{seal(PICKLE, SUBJECT_SEAL_PURPOSE, 'New topic')}'")
    columns = f", {subject[0]}" if subject[0] else ""
    values = f", {subject[1]}" if subject[1] else ""
    await db.execute(
        f"INSERT INTO portal (id, owner, conv_key, kind, room_id, name, participants{columns}) "
        f"VALUES ('p1', $1, 'bob@example.org', 'dm', $2, 'Bob', $3{values})",
        OWNER, ROOM, json.dumps(["bob@example.org"]),
    )
    await db.execute("INSERT INTO ghost (user_id, address, displayname) VALUES "
                     "('@_email_bob=40example.org:localhost', 'bob@example.org', 'Bob')")
    await db.execute("INSERT INTO known_mailbox (user_id, verified_at) VALUES ($1, $2)",
                     OWNER, AGO)
    base = "room_id, message_id, event_id, thread_root, subject"
    if version < 3:
        await db.execute(f"INSERT INTO mail_message ({base}) VALUES ($1, $2, '$ev', '$ev', 'Old')",
                         ROOM, MAIL_ID)
    elif version < 8:
        await db.execute(
            f"INSERT INTO mail_message ({base}, reply_to, cc, refs, created_at) VALUES "
            "($1, $2, '$ev', '$ev', 'Old', 'bob@example.org', 'carol@example.org', '<r0@x>', $3)",
            ROOM, MAIL_ID, AGO,
        )
    else:
        fields = {"subject": "Old", "reply_to": ["bob@example.org"],
                  "cc": ["carol@example.org"], "refs": ["<r0@x>"]}
        await db.execute(
            f"INSERT INTO mail_message ({base}, sealed, created_at) "
            "VALUES ($1, $2, '$ev', '$ev', '', $3, $4)",
            ROOM, MAIL_ID, seal(PICKLE, MAIL_SEAL_PURPOSE, json.dumps(fields)), AGO,
        )


async def _seed_outbox(db: Database, version: int) -> None:
    """A reply waiting in the outbox: plain before v7, sealed from v7 on."""
    raw = seal_bytes(PICKLE, outbox_module.SEAL_PURPOSE, SENT_RAW) if version >= 7 else SENT_RAW
    await db.execute(
        "INSERT INTO outbox (event_id, room_id, owner, thread_root, message_id, mail_from, "
        "recipients, raw, next_attempt, created_at) "
        "VALUES ('$reply', $1, $2, '$ev', $3, 'alice@localhost', $4, $5, $6, $6)",
        ROOM, OWNER, OUT_MID, json.dumps(["bob@example.org"]), raw, AGO,
    )


async def _seed_later(db: Database, version: int) -> None:
    if version >= 4:
        await db.execute("INSERT INTO local_user (user_id, welcomed_at, dm_room_id) "
                         "VALUES ($1, $2, '!dm:localhost')", OWNER, AGO)
    if version >= 6:
        event = {"type": "m.room.encrypted", "room_id": ROOM, "sender": OWNER,
                 "event_id": "$inbox", "origin_server_ts": AGO, "content": {}}
        await db.execute(
            "INSERT INTO matrix_inbox (event_id, room_id, sender, txn_id, raw, received_at) "
            "VALUES ('$inbox', $1, $2, '', $3, $4)", ROOM, OWNER, json.dumps(event), AGO,
        )
    if version >= 9:
        await db.execute("INSERT INTO inbound_seen (user_id, digest, queue_id, received_at) "
                         "VALUES ($1, 'd1', 'q1', $2)", OWNER, AGO)


async def _seed(db: Database, version: int) -> None:
    await _seed_v1(db, version)
    if version >= 2:
        await _seed_queue(db, version)
        await _seed_portal_and_map(db, version)
    if version >= 3:
        await _seed_outbox(db, version)
    await _seed_later(db, version)


async def _check_state(db: Database) -> None:
    assert await BridgeState(db).get("bot.recovery_key") == "sealed-recovery-key"
    # A replay of the old transaction is still recognised, whatever its content.
    assert await TxnLog(db).seen("txn-old", "any-digest")


async def _check_queue(db: Database, version: int) -> None:
    queue = InboundQueue(db, PICKLE)
    (due,) = await queue.due()
    assert (due.queue_id, due.user_id, due.recipient) == ("q1", OWNER, "alice@localhost")
    assert due.raw == QUEUED_RAW and due.auth == {"dmarc": "pass"}
    # The give-up clock of mail queued before v5 runs from its arrival (v5 back-filled it).
    assert due.received_at == AGO
    if version >= 5:
        assert await queue.held_users() == [HELD_USER]
        assert await queue.held_usage(HELD_USER) == (1, len(QUEUED_RAW))
        assert await queue.release_user(HELD_USER) == 1
        assert {d.user_id for d in await queue.due()} == {OWNER, HELD_USER}


async def _check_map(db: Database, version: int) -> None:
    messages, portals = MessageMap(db, PICKLE), PortalStore(db, PICKLE)
    expected = ("Old", ["bob@example.org"], ["carol@example.org"], ["<r0@x>"])
    if version < 3:
        expected = ("Old", [], [], [])
    for sealing in range(2):
        row = await messages.find(ROOM, [MAIL_ID])
        assert row is not None and (row.event_id, row.thread_root) == ("$ev", "$ev")
        assert (row.subject, row.reply_to, row.cc, row.refs) == expected
        assert await messages.rooms_knowing(OWNER, [MAIL_ID]) == ROOM
        portal = await portals.by_room(ROOM)
        assert portal is not None and portal.participants == ["bob@example.org"]
        assert portal.subject == ("New topic" if version >= 3 else "")
        if not sealing:
            # What the bridge does at start: plaintext from before v8 leaves the database.
            assert await messages.seal_plain_rows() == (1 if version < 8 else 0)
            assert await portals.seal_plain_rows() == (1 if version < 8 else 0)
    assert await db.fetchval("SELECT COUNT(*) FROM mail_message WHERE sealed IS NULL") == 0
    assert await db.fetchval("SELECT subject FROM mail_message") == ""


async def _check_outbox(db: Database, version: int) -> None:
    outbox = Outbox(db, PICKLE)
    assert await outbox.knows_message_id(OUT_MID)
    (row,) = await outbox.due()
    assert (row.event_id, row.raw, row.recipients) == ("$reply", SENT_RAW, ["bob@example.org"])


async def _check_later(db: Database, version: int) -> None:
    if version >= 4:
        assert await db.fetchval("SELECT dm_room_id FROM local_user WHERE user_id=$1",
                                 OWNER) == "!dm:localhost"
    if version >= 6:
        inbox = InboxStore(db)
        assert await inbox.rooms() == [ROOM]
        (row,) = await inbox.rows(ROOM)
        assert row.event().event_id == "$inbox"
    if version >= 9:
        assert await db.fetchval("SELECT queue_id FROM inbound_seen WHERE user_id=$1",
                                 OWNER) == "q1"


async def test_an_empty_database_reaches_the_latest_version(db_url: str) -> None:
    db = await open_database(db_url)
    try:
        assert await db.fetchval("SELECT version FROM cloakroom_version") == LATEST
        for table in ("inbound_message", "outbox", "matrix_inbox", "inbound_seen", "portal"):
            assert await db.table_exists(table), table
        assert await InboundQueue(db, PICKLE).due() == []
        assert await Outbox(db, PICKLE).due() == []
        assert await MessageMap(db, PICKLE).seal_plain_rows() == 0
    finally:
        await db.stop()


@pytest.mark.parametrize("version", range(1, LATEST))
async def test_a_database_at_an_earlier_version_keeps_its_data(db_url: str, version: int) -> None:
    async with _database_at(db_url, version) as old:
        await _seed(old, version)
    db = await open_database(db_url)
    try:
        assert await db.fetchval("SELECT version FROM cloakroom_version") == LATEST
        await _check_state(db)
        if version >= 2:
            await _check_queue(db, version)
            await _check_map(db, version)
        if version >= 3:
            await _check_outbox(db, version)
        await _check_later(db, version)
    finally:
        await db.stop()


def test_every_version_is_covered() -> None:
    """A new schema version needs its own seed rows here (and this test bumped)."""
    assert LATEST == 10, "add the new version's rows to _seed and its checks to the test"
