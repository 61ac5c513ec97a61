"""The outbox on SQLite and PostgreSQL: sealed at rest, older rows still readable, pruning,
Message-IDs of our own, and recipients counted for the rate limit."""

from __future__ import annotations

import json

import pytest
from mautrix.util.async_db import Database

from bridge.crypto.sealed import is_sealed_bytes
from bridge.portal.outbox import Outbox, SentRecently
from bridge.worker import now_ms

KEY = "pickle-key-for-tests"
RAW = b"From: a@x\r\nTo: b@y\r\nSubject: secret plans\r\n\r\nmeet at noon\r\n"


async def _add(outbox: Outbox, event_id: str, recipients: list[str] | None = None,
               message_id: str | None = None, raw: bytes = RAW) -> bool:
    return await outbox.add(
        event_id=event_id, room_id="!r:hs", owner="@alice:hs", thread_root=event_id,
        message_id=message_id or f"{event_id.strip('$')}@mail.example", mail_from="alice@x",
        recipients=recipients or ["b@y"], raw=raw,
    )


async def _raw_column(db: Database, event_id: str) -> bytes:
    return bytes(await db.fetchval("SELECT raw FROM outbox WHERE event_id=$1", event_id))


async def test_queued_mail_is_sealed_at_rest_and_unsealed_for_sending(db: Database) -> None:
    outbox = Outbox(db, KEY)
    assert await _add(outbox, "$e1")
    stored = await _raw_column(db, "$e1")
    assert is_sealed_bytes(stored)
    assert b"secret plans" not in stored and b"meet at noon" not in stored
    (row,) = await outbox.due()
    assert row.raw == RAW


async def test_rows_from_before_sealing_still_send(db: Database) -> None:
    # What an older version wrote: the plain mail.
    await db.execute(
        "INSERT INTO outbox (event_id, room_id, owner, thread_root, message_id, mail_from, "
        "recipients, raw, next_attempt, created_at) "
        "VALUES ($1, $2, $3, $1, $4, $5, $6, $7, $8, $8)",
        "$old", "!r:hs", "@alice:hs", "old@mail.example", "alice@x", json.dumps(["b@y"]), RAW,
        now_ms(),
    )
    (row,) = await Outbox(db, KEY).due()
    assert row.raw == RAW


async def test_a_row_sealed_under_another_key_fails_instead_of_sending_garbage(
    db: Database,
) -> None:
    await _add(Outbox(db, KEY), "$e1")
    assert await Outbox(db, "another key").due() == []
    assert await Outbox(db, None).due() == []  # nothing left: the row was marked failed
    state = await db.fetchval("SELECT state FROM outbox WHERE event_id='$e1'")
    assert state == "failed"


async def test_finished_mail_text_is_cleared(db: Database) -> None:
    outbox = Outbox(db, KEY)
    await _add(outbox, "$e1")
    await outbox.finish("$e1", "sent")
    assert await _raw_column(db, "$e1") == b""


async def test_knows_the_message_ids_it_generated(db: Database) -> None:
    outbox = Outbox(db, KEY)
    await _add(outbox, "$e1", message_id="abc123@mail.example")
    assert await outbox.knows_message_id("abc123@mail.example")
    assert await outbox.knows_message_id(" <abc123@mail.example> ")
    await outbox.finish("$e1", "sent")
    assert await outbox.knows_message_id("abc123@mail.example")  # sent: still ours
    assert not await outbox.knows_message_id("abc124@mail.example")
    assert not await outbox.knows_message_id("<>")


async def test_prune_deletes_only_old_finished_rows(db: Database) -> None:
    outbox = Outbox(db, KEY)
    for event_id in ("$sent", "$failed", "$cancelled", "$pending", "$sending", "$recent"):
        await _add(outbox, event_id)
    await outbox.finish("$sent", "sent")
    await outbox.finish("$failed", "failed", "550")
    assert await outbox.cancel("$cancelled")
    assert await outbox.claim("$sending")
    await outbox.finish("$recent", "sent")
    day = 24 * 3600 * 1000
    await db.execute(
        "UPDATE outbox SET created_at = created_at - $1 WHERE event_id != '$recent'", 40 * day
    )
    cutoff = now_ms() - 30 * day  # a cutoff in ms since the epoch, as the retention job gives
    assert await outbox.prune(cutoff) == 3
    left = {r["event_id"] for r in await db.fetch("SELECT event_id FROM outbox")}
    assert left == {"$pending", "$sending", "$recent"}
    assert await outbox.prune(cutoff) == 0


async def test_sent_since_counts_recipients_per_mail(db: Database) -> None:
    outbox = Outbox(db, KEY)
    await _add(outbox, "$one", ["b@y"])
    await _add(outbox, "$three", ["b@y", "c@y", "d@y"])
    await _add(outbox, "$withdrawn", ["b@y", "c@y"])
    assert await outbox.cancel("$withdrawn")
    sent = await outbox.sent_since("@alice:hs", now_ms() - 60_000)
    assert [s.recipients for s in sent] == [1, 3]
    assert all(isinstance(s, SentRecently) for s in sent)
    assert await outbox.sent_since("@bob:hs", 0) == []


@pytest.mark.parametrize("raw", [b"", b"x" * (3 * 1024 * 1024)])
async def test_empty_and_large_mails_round_trip(db: Database, raw: bytes) -> None:
    outbox = Outbox(db, KEY)
    await _add(outbox, "$e1", raw=raw)
    (row,) = await outbox.due()
    assert row.raw == raw
