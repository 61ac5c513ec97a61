"""The durable inbound queue against a real database: SQLite, and PostgreSQL when available.

Every assertion reads back what the queue wrote through plain SQL or the queue's own API; the
clock is real, so "held" deliveries are held for a minute and never become due mid-test.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from mautrix.util.async_db import Database

from bridge.email.queue import InboundQueue, QueuedRecipient
from bridge.worker import now_ms

ALICE, BOB, CAROL = "@alice:hs.test", "@bob:hs.test", "@carol:hs.test"
HOLD_MS = 60_000
BOB_KEY, LIST_KEY = "from:bob@example.test", "list:news.example.test"
AUTH = {"from_domain": "example.test", "spf": "pass", "dkim": "none", "dmarc": "none"}


@pytest.fixture
def queue(db: Database) -> InboundQueue:
    return InboundQueue(db)


def rcpt(user_id: str, tag: str = "") -> QueuedRecipient:
    local = user_id[1:].split(":")[0]
    return QueuedRecipient(user_id, f"{local}{'+' + tag if tag else ''}@bridge.test", tag)


async def put(
    queue: InboundQueue, *users: str, raw: bytes | None = None, key: str = BOB_KEY
) -> str:
    return await queue.enqueue(
        raw=raw or f"Subject: {secrets.token_hex(4)}\r\n\r\nhi\r\n".encode(),
        mail_from="bob@example.test",
        peer="192.0.2.7",
        helo="mx.example.test",
        auth=AUTH,
        recipients=[rcpt(u) for u in users],
        order_key=key,
    )


async def due_pairs(queue: InboundQueue) -> list[tuple[str, str]]:
    return [(d.queue_id, d.user_id) for d in await queue.due()]


async def count(db: Database, table: str, message_id: str) -> int:
    column = "id" if table == "inbound_message" else "message_id"
    return await db.fetchval(f"SELECT COUNT(*) FROM {table} WHERE {column} = $1", message_id)


# Enqueue ------------------------------------------------------------------------------------


async def test_enqueue_stores_raw_envelope_and_one_delivery_per_user(
    db: Database, queue: InboundQueue
) -> None:
    # Not UTF-8, a NUL, a lone CR: the raw text must come back byte for byte.
    raw = b"From: bob@example.test\r\nSubject: x\r\n\r\n\xff\xfe\x00 caf\xc3\xa9 \r end\r\n"
    message_id = await queue.enqueue(
        raw=raw,
        mail_from="bob@example.test",
        peer="192.0.2.7",
        helo="mx.example.test",
        auth=AUTH,
        recipients=[rcpt(ALICE), rcpt(ALICE, "news"), rcpt(BOB, "work")],
        order_key=LIST_KEY,
    )
    row = await db.fetchrow("SELECT * FROM inbound_message WHERE id = $1", message_id)
    assert bytes(row["raw"]) == raw
    assert (row["mail_from"], row["peer"], row["helo"], row["order_key"]) == (
        "bob@example.test",
        "192.0.2.7",
        "mx.example.test",
        LIST_KEY,
    )
    assert json.loads(row["auth"]) == AUTH
    assert abs(row["received_at"] - now_ms()) < 10_000
    deliveries = await db.fetch(
        "SELECT user_id, recipient, tag, state, attempts FROM inbound_delivery "
        "WHERE message_id = $1 ORDER BY user_id",
        message_id,
    )
    # Alice twice (plain and +news) is one delivery: the first address given wins.
    assert [tuple(d) for d in deliveries] == [
        (ALICE, "alice@bridge.test", "", "pending", 0),
        (BOB, "bob+work@bridge.test", "work", "pending", 0),
    ]


async def test_enqueue_without_auth_stores_null(db: Database, queue: InboundQueue) -> None:
    message_id = await queue.enqueue(
        raw=b"x\r\n", mail_from="", peer="::1", helo="h", auth=None, recipients=[rcpt(ALICE)]
    )
    assert await db.fetchval("SELECT auth FROM inbound_message WHERE id=$1", message_id) is None
    (delivery,) = await queue.due()
    assert (delivery.auth, delivery.mail_from, delivery.raw, delivery.order_key) == (
        None,
        "",
        b"x\r\n",
        "",
    )


async def test_due_returns_deliveries_in_arrival_order_with_their_message(
    queue: InboundQueue,
) -> None:
    first = await put(queue, CAROL, raw=b"Subject: first\r\n\r\n1\r\n")
    second = await put(queue, ALICE, BOB)
    third = await put(queue, ALICE)
    due = await queue.due()
    assert [d.queue_id for d in due] == [first, second, second, third]
    assert {d.user_id for d in due if d.queue_id == second} == {ALICE, BOB}
    head = due[0]
    assert (head.user_id, head.recipient, head.tag, head.attempts) == (
        CAROL,
        "carol@bridge.test",
        "",
        0,
    )
    assert (head.raw, head.mail_from, head.auth, head.order_key) == (
        b"Subject: first\r\n\r\n1\r\n",
        "bob@example.test",
        AUTH,
        BOB_KEY,
    )
    assert [d.queue_id for d in await queue.due(limit=2)] == [first, second]


# Holding a conversation's mail in order -----------------------------------------------------


async def test_retry_later_holds_the_user_s_later_mail_but_not_other_users(
    db: Database, queue: InboundQueue
) -> None:
    held = await put(queue, ALICE, BOB)
    later = await put(queue, ALICE)
    carol = await put(queue, CAROL)
    # The same user, another conversation (a list): not held behind Bob's mail.
    news = await put(queue, ALICE, key=LIST_KEY)
    before = now_ms()
    await queue.retry_later(held, ALICE, HOLD_MS, "homeserver said 502")

    row = await db.fetchrow(
        "SELECT attempts, next_attempt, last_error FROM inbound_delivery "
        "WHERE message_id=$1 AND user_id=$2",
        held,
        ALICE,
    )
    assert (row["attempts"], row["last_error"]) == (1, "homeserver said 502")
    assert before + HOLD_MS <= row["next_attempt"] <= now_ms() + HOLD_MS
    # Bob's copy of the same message and Carol's mail go on; Alice's mail from Bob waits.
    assert await due_pairs(queue) == [(held, BOB), (carol, CAROL), (news, ALICE)]
    # Even mail that arrives after the hold must not overtake the held one.
    newer = await put(queue, ALICE, CAROL)
    newer_news = await put(queue, ALICE, key=LIST_KEY)
    assert await due_pairs(queue) == [
        (held, BOB),
        (carol, CAROL),
        (news, ALICE),
        (newer, CAROL),
        (newer_news, ALICE),
    ]
    assert (later, ALICE) not in await due_pairs(queue)
    assert await queue.pending_count() == 8


async def test_held_mail_comes_back_in_order_once_the_hold_expires(queue: InboundQueue) -> None:
    first = await put(queue, ALICE)
    second = await put(queue, ALICE)
    await queue.retry_later(first, ALICE, 300, "try again")
    third = await put(queue, ALICE)
    assert await due_pairs(queue) == []
    await asyncio.sleep(0.4)
    due = await queue.due()
    assert [(d.queue_id, d.attempts) for d in due] == [(first, 1), (second, 0), (third, 0)]


async def test_retry_later_keeps_only_the_first_1000_characters_of_the_error(
    db: Database, queue: InboundQueue
) -> None:
    message_id = await put(queue, ALICE)
    await queue.retry_later(message_id, ALICE, HOLD_MS, "x" * 5000)
    await queue.retry_later(message_id, ALICE, HOLD_MS, "again")
    row = await db.fetchrow(
        "SELECT attempts, last_error FROM inbound_delivery WHERE message_id=$1", message_id
    )
    assert (row["attempts"], row["last_error"]) == (2, "again")
    await queue.retry_later(message_id, ALICE, HOLD_MS, "y" * 5000)
    assert await db.fetchval("SELECT last_error FROM inbound_delivery") == "y" * 1000


# Parts already posted ------------------------------------------------------------------------


async def test_record_part_round_trip_and_idempotent(queue: InboundQueue) -> None:
    message_id = await put(queue, ALICE, BOB)
    assert await queue.done_parts(message_id, ALICE) == {}
    await queue.record_part(message_id, ALICE, 0, "$first")
    await queue.record_part(message_id, ALICE, 2, "$third")
    # A retry recording the same part again changes nothing and raises nothing.
    await queue.record_part(message_id, ALICE, 0, "$duplicate")
    assert await queue.done_parts(message_id, ALICE) == {0: "$first", 2: "$third"}
    assert await queue.done_parts(message_id, BOB) == {}
    await queue.record_part(message_id, BOB, 0, "$bob")
    assert await queue.done_parts(message_id, BOB) == {0: "$bob"}


# Finishing -----------------------------------------------------------------------------------


async def test_delivered_to_everyone_deletes_the_message_and_its_raw_text(
    db: Database, queue: InboundQueue
) -> None:
    message_id = await put(queue, ALICE, BOB, raw=b"Subject: secret\r\n\r\nsecret body\r\n")
    other = await put(queue, ALICE)
    await queue.record_part(message_id, ALICE, 0, "$a")
    await queue.finish(message_id, ALICE, "delivered")
    # Bob's delivery is still pending: the message must stay.
    assert await count(db, "inbound_message", message_id) == 1
    await queue.finish(message_id, BOB, "delivered")
    for table in ("inbound_message", "inbound_delivery", "delivered_part"):
        assert await count(db, table, message_id) == 0, table
    raw = b"Subject: secret\r\n\r\nsecret body\r\n"
    assert await db.fetch("SELECT id FROM inbound_message WHERE raw = $1", raw) == []
    # Other mail is untouched.
    assert await count(db, "inbound_message", other) == 1
    assert await due_pairs(queue) == [(other, ALICE)]


@pytest.mark.parametrize(
    ("states", "kept"),
    [
        (["delivered", "failed"], True),
        (["failed", "delivered"], True),
        (["failed", "failed"], True),
        (["delivered", "delivered"], False),
    ],
)
async def test_a_failed_delivery_keeps_the_message(
    db: Database, queue: InboundQueue, states: list[str], kept: bool
) -> None:
    message_id = await put(queue, ALICE, BOB)
    for user_id, state in zip((ALICE, BOB), states, strict=True):
        await queue.finish(message_id, user_id, state, f"{state} for {user_id}")
    assert await count(db, "inbound_message", message_id) == int(kept)
    if kept:
        raw = await db.fetchval("SELECT raw FROM inbound_message WHERE id=$1", message_id)
        assert bytes(raw).startswith(b"Subject: ")
        errors = await db.fetch(
            "SELECT user_id, state, last_error FROM inbound_delivery WHERE message_id=$1 "
            "ORDER BY user_id",
            message_id,
        )
        assert [tuple(r) for r in errors] == [
            (ALICE, states[0], f"{states[0]} for {ALICE}"),
            (BOB, states[1], f"{states[1]} for {BOB}"),
        ]
    # Finished deliveries, failed or not, are never due again.
    assert await queue.due() == []
    assert await queue.pending_count() == 0


async def test_a_failed_delivery_does_not_hold_the_user_s_later_mail(queue: InboundQueue) -> None:
    failed = await put(queue, ALICE)
    later = await put(queue, ALICE)
    await queue.finish(failed, ALICE, "failed", "undeliverable")
    assert await due_pairs(queue) == [(later, ALICE)]


# Counters ------------------------------------------------------------------------------------


async def test_next_due_at_and_pending_count(queue: InboundQueue) -> None:
    assert await queue.next_due_at() is None
    assert await queue.pending_count() == 0
    start = now_ms()
    first = await put(queue, ALICE, BOB)
    second = await put(queue, CAROL)
    assert await queue.pending_count() == 3
    assert start <= await queue.next_due_at() <= now_ms()

    await queue.retry_later(first, ALICE, HOLD_MS, "later")
    await queue.retry_later(first, BOB, HOLD_MS, "later")
    # Carol's mail is due now; the held ones in a minute.
    assert await queue.next_due_at() <= now_ms()
    await queue.finish(second, CAROL, "delivered")
    assert await queue.pending_count() == 2
    assert start + HOLD_MS <= await queue.next_due_at() <= now_ms() + HOLD_MS

    await queue.finish(first, ALICE, "delivered")
    await queue.finish(first, BOB, "failed", "gone")
    assert await queue.pending_count() == 0
    assert await queue.next_due_at() is None


# Held mail: waiting for the reader's first device --------------------------------------------


async def test_held_mail_waits_then_comes_back_in_order(db: Database, queue: InboundQueue) -> None:
    first, second = await put(queue, ALICE), await put(queue, ALICE)
    bobs = await put(queue, BOB)
    assert await queue.hold_user(ALICE) == 2
    # Held mail is neither due nor pending, and does not keep Bob's mail back.
    assert await due_pairs(queue) == [(bobs, BOB)]
    assert await queue.pending_count() == 1
    assert await queue.held_users() == [ALICE]
    # A held mail is not finished: the message (and its raw text) stays.
    await queue.finish(bobs, BOB, "delivered")
    assert await count(db, "inbound_message", first) == 1
    assert await queue.release_user(ALICE) == 2
    assert await due_pairs(queue) == [(first, ALICE), (second, ALICE)]
    assert await queue.held_users() == []


async def test_held_usage_counts_messages_and_bytes(queue: InboundQueue) -> None:
    await put(queue, ALICE, raw=b"x" * 1000)
    await put(queue, ALICE, raw=b"y" * 500)
    await put(queue, BOB, raw=b"z" * 10)
    assert await queue.held_usage(ALICE) == (0, 0)
    await queue.hold_user(ALICE)
    assert await queue.held_usage(ALICE) == (2, 1500)
    assert await queue.held_usage(BOB) == (0, 0)


async def test_raw_mail_is_sealed_at_rest(db: Database) -> None:
    sealed_queue = InboundQueue(db, pickle_key="test-pickle-key")
    secret = b"Subject: the secret plans\r\n\r\nmeet at dawn\r\n"
    queue_id = await put(sealed_queue, ALICE, raw=secret)
    stored = bytes(await db.fetchval("SELECT raw FROM inbound_message WHERE id=$1", queue_id))
    assert b"secret plans" not in stored and b"dawn" not in stored
    (due,) = await sealed_queue.due()
    assert due.raw == secret
    # A row from before sealing (plain text) is still delivered as it is.
    legacy = await put(queue_without_key := InboundQueue(db), BOB, raw=b"Subject: old\r\n\r\nx")
    assert queue_without_key is not None
    assert {d.queue_id: d.raw for d in await sealed_queue.due()}[legacy] == b"Subject: old\r\n\r\nx"


async def test_prune_failed_forgets_old_failures_only(db: Database, queue: InboundQueue) -> None:
    old = await put(queue, ALICE)
    # Received long ago, failed just now: the admin still gets the whole retention time.
    await db.execute("UPDATE inbound_message SET received_at=0")
    await queue.finish(old, ALICE, "failed", "gone")
    recent_cutoff = now_ms() - 3600_000
    assert await queue.prune_failed(recent_cutoff) == 0
    assert await count(db, "inbound_message", old) == 1
    assert await queue.prune_failed(now_ms() + 1) == 1
    assert await count(db, "inbound_message", old) == 0


async def test_a_resend_of_mail_already_taken_is_not_queued_again(
    db: Database, queue: InboundQueue
) -> None:
    raw = b"Subject: once\r\nMessage-ID: <x@y>\r\n\r\nthe same bytes\r\n"
    first = await put(queue, ALICE, raw=raw)
    # The sender never saw our 250 and sends the very same mail again: same answer, no copy.
    assert await put(queue, ALICE, raw=raw) == first
    assert await count(db, "inbound_message", first) == 1
    assert await db.fetchval("SELECT COUNT(*) FROM inbound_message") == 1
    # Bob was not on the first copy: for him it is new.
    other = await put(queue, ALICE, BOB, raw=raw)
    assert other != first
    assert await due_pairs(queue) == [(first, ALICE), (other, BOB)]
    # A different mail is never taken for a resend, and after the window it is new again.
    assert await put(queue, ALICE, raw=raw + b"!") != first
    assert await queue.prune_seen(now_ms() + 1) == 3
    assert await put(queue, ALICE, raw=raw) not in (first, other)
