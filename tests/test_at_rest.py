"""Nothing readable at rest, nothing in reprs: sealed thread metadata, pruning, the WAL.

Component tests run on SQLite and PostgreSQL (the `db` fixture); the last test is end to end:
a real mail through the real bridge, then its database files are searched for the mail's words.
"""

from __future__ import annotations

import asyncio
import secrets
from email.utils import getaddresses, parseaddr
from pathlib import Path
from typing import Any

import pytest
from mautrix.util.async_db import Database
from nio import RoomMessageText

from bridge.crypto.sealed import UnsealError
from bridge.db import TxnLog, checkpoint_wal, is_sqlite, vacuum
from bridge.email.outbound import RelaySettings
from bridge.email.queue import InboundQueue, QueuedRecipient
from bridge.portal.outbox import Outbox
from bridge.portal.store import MailMessageRow, MessageMap, PortalRow, PortalStore
from bridge.retention import DAY_MS, Prune, Retention
from bridge.worker import now_ms

from .harness import Env, accept_invite, wait_for_event
from .mail import make_mail, send, unique
from .test_config import error, load

KEY = "test pickle key"
ROOM = "!room:example.org"


def _row(token: str, message_id: str = "m1@example.org") -> MailMessageRow:
    return MailMessageRow(
        room_id=ROOM,
        message_id=message_id,
        event_id=f"$ev-{message_id}",
        thread_root="$root",
        subject=f"Subject {token}",
        reply_to=[f"{token}-reply@example.org"],
        cc=[f"{token}-cc@example.org"],
        refs=[f"{token}-ref@example.org"],
    )


async def _raw_text(db: Database, table: str) -> str:
    """Every value of every row of a table, as one text: what a copy of the database shows."""
    rows = await db.fetch(f"SELECT * FROM {table}")
    return " ".join(str(value) for row in rows for value in tuple(row))


def _sqlite_path(db: Database) -> Path:
    return Path(str(db.url.path))


def _files_containing(path: Path, token: str) -> list[str]:
    """The database file, its WAL and shared-memory index: which ones hold the token."""
    found = []
    for suffix in ("", "-wal", "-shm"):
        file = Path(f"{path}{suffix}")
        if file.exists() and token.encode() in file.read_bytes():
            found.append(file.name)
    return found


# Sealed rows.


async def test_message_map_row_is_sealed_and_reads_back(db: Database) -> None:
    token = unique("mm")
    messages = MessageMap(db, KEY)
    row = _row(token)
    await messages.put(row)
    stored = await _raw_text(db, "mail_message")
    assert token not in stored
    assert "m1@example.org" in stored  # Message-IDs stay plain: rows are looked up by them
    assert await messages.by_event(ROOM, row.event_id) == row
    assert await messages.find(ROOM, ["unknown@x", row.message_id]) == row
    assert await messages.latest_in_thread(ROOM, "$root") == row
    assert await messages.latest_in_room(ROOM) == row


async def test_message_map_with_the_wrong_key_refuses_to_read(db: Database) -> None:
    await MessageMap(db, KEY).put(_row(unique("wk")))
    with pytest.raises(UnsealError):
        await MessageMap(db, "another key").by_event(ROOM, "$ev-m1@example.org")


async def test_portal_subject_is_sealed_and_reads_back(db: Database) -> None:
    token = unique("ps")
    portals = PortalStore(db, KEY)
    portal = await portals.get_or_create(
        "@alice:example.org", "dm:bob@example.org", "dm", "bob", ["bob@example.org"],
        f"Lunch {token}",
    )
    assert portal.subject == f"Lunch {token}"
    await portals.set_subject(portal.id, f"Dinner {token}")
    assert token not in await _raw_text(db, "portal")
    again = await portals.by_key("@alice:example.org", "dm:bob@example.org")
    assert again is not None and again.subject == f"Dinner {token}"


async def _put_legacy_rows(db: Database, token: str) -> None:
    """Rows as the bridge wrote them before sealing: plain columns, no sealed value."""
    await db.execute(
        "INSERT INTO mail_message (room_id, message_id, event_id, thread_root, subject, "
        "reply_to, cc, refs, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        ROOM, "old@example.org", "$old", "$root", f"Old {token}",
        f"{token}-r@example.org", f"{token}-c1@example.org {token}-c2@example.org",
        "a@x b@x", 1,
    )
    await db.execute(
        "INSERT INTO portal (id, owner, conv_key, kind, name, participants, subject) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7)",
        "p-old", "@alice:example.org", "dm:old@example.org", "dm", "old", '["old@example.org"]',
        f"New {token}",
    )


async def test_legacy_plain_rows_read_then_are_sealed(db: Database) -> None:
    token = unique("legacy")
    await _put_legacy_rows(db, token)
    messages, portals = MessageMap(db, KEY), PortalStore(db, KEY)
    expected = MailMessageRow(
        room_id=ROOM, message_id="old@example.org", event_id="$old", thread_root="$root",
        subject=f"Old {token}", reply_to=[f"{token}-r@example.org"],
        cc=[f"{token}-c1@example.org", f"{token}-c2@example.org"], refs=["a@x", "b@x"],
    )
    assert await messages.by_event(ROOM, "$old") == expected
    legacy_portal = await portals.by_key("@alice:example.org", "dm:old@example.org")
    assert legacy_portal is not None and legacy_portal.subject == f"New {token}"

    assert await messages.seal_plain_rows() == 1
    assert await portals.seal_plain_rows() == 1
    assert token not in await _raw_text(db, "mail_message")
    assert token not in await _raw_text(db, "portal")
    assert await messages.by_event(ROOM, "$old") == expected
    sealed_portal = await portals.by_key("@alice:example.org", "dm:old@example.org")
    assert sealed_portal is not None and sealed_portal.subject == f"New {token}"
    # Nothing left to do on the next start.
    assert await messages.seal_plain_rows() == 0
    assert await portals.seal_plain_rows() == 0


async def test_sealing_legacy_rows_leaves_no_copy_in_the_sqlite_files(db: Database) -> None:
    if not is_sqlite(db):
        pytest.skip("SQLite files only; PostgreSQL: see the README on VACUUM")
    token = unique("legacyfile")
    await _put_legacy_rows(db, token)
    assert await checkpoint_wal(db)  # the old rows are in the main file, as after a long run
    assert _files_containing(_sqlite_path(db), token) == ["bridge.db"]
    await MessageMap(db, KEY).seal_plain_rows()
    await PortalStore(db, KEY).seal_plain_rows()
    assert await checkpoint_wal(db)
    assert _files_containing(_sqlite_path(db), token) == []


async def test_many_legacy_rows_are_sealed_in_batches(db: Database) -> None:
    token = unique("batch")
    for i in range(1205):  # more than two batches of SEAL_BATCH
        await db.execute(
            "INSERT INTO mail_message (room_id, message_id, event_id, thread_root, subject) "
            "VALUES ($1, $2, $3, $4, $5)", ROOM, f"{i}@x", f"${i}", "$r", f"{token} {i}",
        )
    messages = MessageMap(db, KEY)
    assert await messages.seal_plain_rows() == 1205
    assert token not in await _raw_text(db, "mail_message")
    row = await messages.find(ROOM, ["1204@x"])
    assert row is not None and row.subject == f"{token} 1204"


# The Message-ID index.


async def test_mail_message_message_id_is_indexed(db: Database) -> None:
    if is_sqlite(db):
        indexed = await db.fetchval(
            "SELECT sql FROM sqlite_master WHERE type='index' AND name='mail_message_message_id'"
        )
        assert indexed is not None and "(message_id)" in indexed
        plan = await db.fetch(
            "EXPLAIN QUERY PLAN SELECT room_id FROM mail_message WHERE message_id=$1", "x@y"
        )
        assert any("mail_message_message_id" in str(tuple(step)) for step in plan)
    else:
        definition = await db.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE indexname='mail_message_message_id'"
        )
        assert definition is not None and "(message_id)" in definition


async def test_rooms_knowing_finds_the_room_by_message_id(db: Database) -> None:
    portals, messages = PortalStore(db, KEY), MessageMap(db, KEY)
    portal = await portals.get_or_create("@alice:example.org", "dm:b@x", "dm", "b", ["b@x"])
    await portals.set_room(portal.id, ROOM)
    await messages.put(_row(unique("rk"), "known@example.org"))
    assert await messages.rooms_knowing("@alice:example.org", ["nope@x", "known@example.org"]) \
        == ROOM
    assert await messages.rooms_knowing("@mallory:example.org", ["known@example.org"]) is None


# Secrets and content out of reprs.


def test_relay_password_is_not_in_the_repr() -> None:
    password = secrets.token_urlsafe(12)
    relay = RelaySettings("relay.example.org", 587, "starttls", "bridge", password, 30.0)
    assert password not in repr(relay) and password not in str(relay)
    assert relay.password == password


def test_mail_content_is_not_in_row_reprs() -> None:
    token = unique("repr")
    assert token not in repr(_row(token))
    portal = PortalRow("p", "@a:x", "dm:b@x", "dm", None, "b", ["b@x"], subject=token)
    assert token not in repr(portal)


# The retention setting.


def test_retention_days_defaults_to_a_week_and_must_cover_the_rate_window() -> None:
    assert load()["email.retention_days"] == 7
    assert error({"email.retention_days": 0}).key == "email.retention_days"
    too_short = error({"email.retention_days": 1, "email.outbound.rate_window_seconds": 200_000})
    assert too_short.key == "email.retention_days"


# Pruning and the WAL.


async def test_retention_runs_every_prune_with_its_own_cutoff(db: Database) -> None:
    calls: dict[str, int] = {}

    def recorder(name: str) -> Any:
        async def run(cutoff: int) -> int:
            calls[name] = cutoff
            if name == "broken":
                raise RuntimeError("boom")
            return 1
        return run

    before = now_ms()
    retention = Retention(db, [
        Prune("broken", recorder("broken"), DAY_MS),
        Prune("week", recorder("week"), 7 * DAY_MS, tables=("outbox",)),
        Prune("hour", recorder("hour"), 3600_000, tables=("appservice_txn",)),
    ])
    results = await retention.prune_all()
    # The broken one is logged and skipped; the others still ran (and VACUUM after them).
    assert results == {"week": 1, "hour": 1}
    assert before - 7 * DAY_MS <= calls["week"] <= now_ms() - 7 * DAY_MS
    assert before - 3600_000 <= calls["hour"] <= now_ms() - 3600_000
    assert "broken" in calls


async def test_retention_prunes_the_transaction_log_failed_mail_and_the_outbox(
    db: Database,
) -> None:
    txn_log, queue, outbox = TxnLog(db), InboundQueue(db, KEY), Outbox(db, KEY)
    old = now_ms() - 8 * DAY_MS
    await db.execute("INSERT INTO appservice_txn (txn_id, processed_at) VALUES ('old', $1)", old)
    await txn_log.mark("new")
    queue_id = await queue.enqueue(
        raw=b"Subject: x\r\n\r\nx", mail_from="bob@example.org", peer="127.0.0.1", helo="h",
        auth=None, recipients=[QueuedRecipient("@alice:example.org", "alice@example.org", "")],
    )
    await queue.finish(queue_id, "@alice:example.org", "failed", "gone for good")
    # Failed long ago (retention counts from the failure, kept in next_attempt).
    await db.execute("UPDATE inbound_message SET received_at=$1", old)
    await db.execute("UPDATE inbound_delivery SET next_attempt=$1", old)
    for event_id in ("$sent", "$pending"):
        await outbox.add(event_id=event_id, room_id=ROOM, owner="@alice:example.org",
                         thread_root=event_id, message_id=f"{event_id[1:]}@example.org",
                         mail_from="alice@example.org", recipients=["bob@example.org"],
                         raw=b"Subject: x\r\n\r\nx")
    await outbox.finish("$sent", "sent")
    await db.execute("UPDATE outbox SET created_at=$1", old)
    retention = Retention(db, [
        Prune("transaction log", txn_log.prune, TxnLog.RETENTION_MS, ("appservice_txn",)),
        Prune("failed inbound mail", queue.prune_failed, 7 * DAY_MS,
              ("inbound_message", "inbound_delivery")),
        Prune("outbox", outbox.prune, 7 * DAY_MS, ("outbox",)),
    ])
    assert await retention.prune_all() == {
        "transaction log": 1, "failed inbound mail": 1, "outbox": 1,
    }
    assert not await txn_log.seen("old") and await txn_log.seen("new")
    assert await db.fetchval("SELECT COUNT(*) FROM inbound_message") == 0
    # What has not left yet stays, however old.
    assert await db.fetchval("SELECT event_id FROM outbox") == "$pending"


async def test_checkpoint_truncates_the_wal_and_deleted_bytes_are_gone(db: Database) -> None:
    token = unique("wal")
    await db.execute("INSERT INTO bridge_state (key, value) VALUES ('k', $1)", token * 50)
    await db.execute("DELETE FROM bridge_state WHERE key='k'")
    if not is_sqlite(db):
        assert await checkpoint_wal(db)  # nothing to do on PostgreSQL
        await vacuum(db, ["bridge_state"])  # runs outside a transaction, as VACUUM must
        return
    path = _sqlite_path(db)
    assert "bridge.db-wal" in _files_containing(path, token)  # the page before the delete
    assert await checkpoint_wal(db)
    assert Path(f"{path}-wal").stat().st_size == 0
    assert _files_containing(path, token) == []  # and secure_delete zeroed it in the main file


class _WatchedRetention(Retention):
    """Signals each checkpoint, so the test waits for the job instead of for time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoints: asyncio.Queue[bool] = asyncio.Queue()

    async def checkpoint(self) -> bool:
        done = await super().checkpoint()
        self.checkpoints.put_nowait(done)
        return done


async def test_retention_job_prunes_at_start_and_checkpoints_when_asked(db: Database) -> None:
    pruned = asyncio.Event()

    async def prune(cutoff: int) -> int:
        pruned.set()
        return 0

    # Intervals far beyond the test: whatever happens, happens because it was asked for.
    retention = _WatchedRetention(db, [Prune("x", prune, DAY_MS)], prune_interval=3600,
                                  checkpoint_interval=3600, checkpoint_min_gap=0)
    retention.start()
    try:
        await asyncio.wait_for(pruned.wait(), 10)
        assert await asyncio.wait_for(retention.checkpoints.get(), 10)  # after the prunes
        await db.execute("INSERT INTO bridge_state (key, value) VALUES ('k', 'v')")
        await db.execute("DELETE FROM bridge_state WHERE key='k'")
        retention.checkpoint_soon()
        assert await asyncio.wait_for(retention.checkpoints.get(), 10)
        if is_sqlite(db):
            assert Path(f"{_sqlite_path(db)}-wal").stat().st_size == 0
    finally:
        await retention.stop()


# End to end: the real bridge, a real mail, then the database files.

ATTACHMENT_NAME = "notes-{token}.txt"


def _mail_with_everything(to: str, token: str, reply_to: str, cc: str) -> Any:
    msg = make_mail(
        to=to,
        subject=f"Quarterly figures {token}",
        text=f"The body says {token}-body and nothing else",
        cc=cc,
        headers={"Reply-To": reply_to},
    )
    msg.add_attachment(f"attached {token}-attachment".encode(), maintype="text",
                       subtype="plain", filename=ATTACHMENT_NAME.format(token=token))
    return msg


async def test_delivered_mail_leaves_no_plaintext_and_still_threads(running: Env) -> None:
    alice = await running.new_user()
    to = f"{alice.user_id[1:].split(':')[0]}@localhost"
    # The token is in the subject, body and attachment; the addresses are plain ghosts' addresses
    # (they must stay readable: ghosts are named after them), so they carry no token.
    token = secrets.token_hex(8)
    reply_to = f"replies-{secrets.token_hex(4)}@example.org"
    cc = f"carol-{secrets.token_hex(4)}@example.net"
    await send(running.smtp_port, _mail_with_everything(to, token, reply_to, cc), [to])
    room_id = await accept_invite(alice)
    root = await wait_for_event(alice, room_id, lambda e: isinstance(e, RoomMessageText)
                                and f"{token}-body" in e.body)
    await wait_for_event(alice, room_id, lambda e: ATTACHMENT_NAME.format(token=token)
                         in getattr(e, "source", {}).get("content", {}).get("body", ""))

    path = Path(running.config["database"].removeprefix("sqlite:"))
    assert _files_containing(path, token) == [], "mail content at rest in the bridge database"
    # Nor in its log, which runs at DEBUG in the tests (every request to the homeserver).
    assert token not in running.bridge.log_path.read_text(errors="replace")

    # The sealed subject and Reply-To/Cc still do their work: the answer threads.
    answer = unique("answer")
    await alice.room_send(room_id, "m.room.message", {
        "msgtype": "m.text", "body": answer,
        "m.relates_to": {"rel_type": "m.thread", "event_id": root.event_id,
                         "is_falling_back": True, "m.in_reply_to": {"event_id": root.event_id}},
    }, ignore_unverified_devices=True)
    (mail,) = await asyncio.to_thread(running.relay.wait_for,
                                      lambda r: answer.encode() in r.data, 1, 60)
    msg = mail.message
    assert msg["Subject"] == f"Re: Quarterly figures {token}"
    assert [parseaddr(a)[1] for a in msg.get_all("To")] == [reply_to]
    assert cc in [a for _, a in getaddresses(msg.get_all("Cc", []))]

