"""The Matrix inbox (bridge/matrix/inbox.py) against a real database, with fake crypto.

Keys "arrive" when the test says so; time is a fake clock. Waiting uses the room queues'
own drain, never sleeps.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from mautrix.errors import DecryptionError, SessionNotFound
from mautrix.types import (
    EncryptedEvent,
    Event,
    EventID,
    MessageEvent,
    RedactionEvent,
    RoomID,
    UserID,
)
from mautrix.util.async_db import Database

from bridge.db import TxnLog
from bridge.matrix import appservice
from bridge.matrix import inbox as inbox_module
from bridge.matrix.inbox import Inbox, InboxStore
from bridge.matrix.queues import RoomQueues

ROOM = RoomID("!room:hs")
OTHER_ROOM = RoomID("!other:hs")
ALICE = UserID("@alice:hs")
BOB = UserID("@bob:hs")


def encrypted(sender: UserID, session: str, body: str, room: RoomID = ROOM) -> EncryptedEvent:
    return EncryptedEvent.deserialize({
        "type": "m.room.encrypted", "room_id": room, "sender": sender,
        "event_id": f"$e-{secrets.token_hex(6)}", "origin_server_ts": 1,
        "content": {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": body,
                    "session_id": session, "sender_key": "K", "device_id": "D"},
    })


@dataclass
class Crypto:
    """Ciphertext is the plaintext; a session decrypts once its key has 'arrived'."""

    keys: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)  # sessions whose messages fail for good
    waiters: dict[str, asyncio.Future[bool]] = field(default_factory=dict)

    async def decrypt(self, evt: EncryptedEvent) -> Event:
        session = str(evt.content.session_id)
        if session in self.broken:
            raise DecryptionError("bad MAC")
        if session not in self.keys:
            raise SessionNotFound(session)
        return MessageEvent.deserialize({
            "type": "m.room.message", "room_id": evt.room_id, "sender": evt.sender,
            "event_id": evt.event_id, "origin_server_ts": 1,
            "content": {"msgtype": "m.text", "body": evt.content.ciphertext},
        })

    async def wait_for_session(self, room_id: RoomID, session: str, timeout: float) -> bool:
        fut = self.waiters.setdefault(session, asyncio.get_running_loop().create_future())
        # Shielded, as mautrix does: a cancelled waiter must not cancel the shared future.
        return await asyncio.shield(fut)  # the inbox keeps its own deadline by timer

    def arrive(self, session: str) -> None:
        self.keys.add(session)
        fut = self.waiters.pop(session, None)
        if fut and not fut.done():
            fut.set_result(True)


@dataclass
class World:
    crypto: Crypto = field(default_factory=Crypto)
    handled: list[tuple[UserID, str]] = field(default_factory=list)
    told: list[tuple[RoomID, UserID, EventID]] = field(default_factory=list)
    crash_on: set[str] = field(default_factory=set)
    now: int = 1_000_000
    inboxes: list[Inbox] = field(default_factory=list)

    async def handle(self, evt: Event) -> None:
        if isinstance(evt, RedactionEvent):
            self.handled.append((evt.sender, f"redacts {evt.redacts}"))
            return
        body = evt.content.body
        if body in self.crash_on:
            raise RuntimeError("handler bug")
        self.handled.append((evt.sender, body))

    async def tell(self, room_id: RoomID, sender: UserID, event_id: EventID) -> None:
        self.told.append((room_id, sender, event_id))


@pytest.fixture
async def world(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    w = World()
    monkeypatch.setattr(inbox_module, "now_ms", lambda: w.now)
    yield w
    for inbox in w.inboxes:  # no timer of this test may fire in the next one
        await inbox.stop()
        await inbox.queues.drain()


def make_inbox(db: Database, world: World, queues: RoomQueues | None = None) -> Inbox:
    inbox = Inbox(
        InboxStore(db), queues or RoomQueues(),
        decrypt=world.crypto.decrypt, handle=world.handle, tell_undecryptable=world.tell,
        wait_for_session=world.crypto.wait_for_session, undecryptable_after_seconds=300,
    )
    world.inboxes.append(inbox)
    return inbox


async def settle(inbox: Inbox) -> None:
    """Everything queued so far, and what it queued in turn, has run."""
    for _ in range(5):
        await inbox.queues.drain()
        await asyncio.sleep(0)  # let woken watchers submit their rooms


async def pending(db: Database) -> int:
    return await db.fetchval("SELECT COUNT(*) FROM matrix_inbox")


async def test_a_late_key_holds_only_its_senders_later_messages(db: Database, world: World
                                                                ) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    world.crypto.keys |= {"bob", "alice-2", "x"}  # every key but the first one's
    await inbox.record(encrypted(ALICE, "late", "alice 1"))
    await inbox.record(encrypted(BOB, "bob", "bob 1"))
    await inbox.record(encrypted(ALICE, "alice-2", "alice 2"))
    await inbox.record(encrypted(ALICE, "x", "other room", room=OTHER_ROOM))
    await settle(inbox)
    # Bob and the other room go at once; Alice's second message waits for her first.
    assert sorted(world.handled) == [(ALICE, "other room"), (BOB, "bob 1")]
    world.crypto.arrive("late")  # minutes later, the room key comes
    await settle(inbox)
    assert world.handled[2:] == [(ALICE, "alice 1"), (ALICE, "alice 2")]
    assert world.told == [] and await pending(db) == 0


async def test_an_event_unreadable_past_the_bound_gets_a_notice(db: Database, world: World
                                                                 ) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    world.crypto.keys.add("ok")
    never = encrypted(ALICE, "never", "lost")
    await inbox.record(never)
    await inbox.record(encrypted(ALICE, "ok", "after"))
    await settle(inbox)
    assert world.handled == [] and world.told == []
    world.now += 301_000  # past bridge.undecryptable_after_seconds
    inbox.schedule(ROOM)  # what the inbox's own timer does at that moment
    await settle(inbox)
    assert world.told == [(ROOM, ALICE, never.event_id)]
    assert world.handled == [(ALICE, "after")]
    assert await pending(db) == 0


async def test_a_broken_event_is_told_at_once(db: Database, world: World) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    world.crypto.broken.add("bad")
    bad = encrypted(ALICE, "bad", "x")
    await inbox.record(bad)
    await settle(inbox)
    assert world.told == [(ROOM, ALICE, bad.event_id)] and await pending(db) == 0


async def test_rows_wait_until_their_transaction_is_recorded(db: Database, world: World
                                                              ) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    world.crypto.keys.add("s")
    txn = appservice.IncomingTransaction("t1")
    token = appservice._current.set(txn)
    try:
        await inbox.record(encrypted(ALICE, "s", "hello"))
    finally:
        appservice._current.reset(token)
    assert await db.fetchval("SELECT txn_id FROM matrix_inbox") == "t1"
    other = asyncio.create_task(inbox.queues.drain())
    await asyncio.sleep(0)
    assert world.handled == [] and not other.done()
    txn.done.set()
    await other
    assert world.handled == [(ALICE, "hello")]


async def test_a_restart_resumes_rows_and_drops_unfinished_transactions(
    db: Database, world: World
) -> None:
    first = make_inbox(db, world)
    await first.start()
    txns = []
    for txn_id, body in (("done", "kept"), ("never-marked", "resent by synapse")):
        txn = appservice.IncomingTransaction(txn_id)
        txns.append(txn)
        token = appservice._current.set(txn)
        try:
            await first.record(encrypted(ALICE, "k", body))
        finally:
            appservice._current.reset(token)
    await TxnLog(db).mark("done")
    # The process dies here: nothing was handled (the transactions never finished in it).
    world.crypto.keys.add("k")
    second = make_inbox(db, world)
    await second.start()
    await settle(second)
    assert world.handled == [(ALICE, "kept")] and await pending(db) == 0
    for txn in txns:  # the first process's queued work may end now (it finds nothing)
        txn.done.set()


async def test_a_crashing_handler_is_retried_then_dropped_without_holding_others(
    db: Database, world: World
) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    world.crypto.keys.add("s")
    world.crash_on.add("poison")
    await inbox.record(encrypted(ALICE, "s", "poison"))
    await inbox.record(encrypted(BOB, "s", "bob"))
    await settle(inbox)
    assert world.handled == [(BOB, "bob")]
    assert await db.fetchval("SELECT attempts FROM matrix_inbox") == 1
    for _ in range(inbox_module.MAX_ATTEMPTS):
        world.now += inbox_module.RETRY_CAP_MS + 1
        inbox.schedule(ROOM)
        await settle(inbox)
    assert await pending(db) == 0


async def test_a_message_redacted_while_waiting_is_never_handled_nor_told(
    db: Database, world: World
) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    waiting = encrypted(ALICE, "late", "oops")
    await inbox.record(waiting)
    await settle(inbox)
    await inbox.record(RedactionEvent.deserialize({
        "type": "m.room.redaction", "room_id": ROOM, "sender": ALICE, "event_id": "$red",
        "origin_server_ts": 2, "redacts": waiting.event_id, "content": {},
    }))
    await settle(inbox)
    world.now += 301_000
    inbox.schedule(ROOM)
    await settle(inbox)
    assert world.handled == [(ALICE, f"redacts {waiting.event_id}")]
    assert world.told == [] and await pending(db) == 0


async def test_after_a_long_downtime_the_bound_runs_from_the_restart(
    db: Database, world: World
) -> None:
    first = make_inbox(db, world)
    await first.start()
    await first.record(encrypted(ALICE, "backlog", "written while we were down"))
    await settle(first)
    await first.stop()
    world.now += 3600_000  # an hour down, far past the bound
    second = make_inbox(db, world)
    await second.start()
    await settle(second)
    assert world.told == []  # the key may be in the backlog Synapse is about to deliver
    world.crypto.arrive("backlog")
    await settle(second)
    assert world.handled == [(ALICE, "written while we were down")]


async def test_an_event_sent_again_under_a_new_transaction_is_handled_once(
    db: Database, world: World
) -> None:
    inbox = make_inbox(db, world)
    await inbox.start()
    world.crypto.keys.add("s")
    evt = encrypted(ALICE, "s", "once")
    await inbox.record(evt)
    await settle(inbox)
    await inbox.record(evt)  # the homeserver lost track and sends it again
    await settle(inbox)
    assert world.handled == [(ALICE, "once")] and await pending(db) == 0
