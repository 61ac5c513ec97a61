"""The Matrix inbox: events the bridge owes an answer, recorded before Synapse gets its 200.

An appservice transaction is acknowledged only after each message, encrypted message and
redaction the bridge must act on is a row in ``matrix_inbox`` (still encrypted, as received).
Rows are handled off the transaction path, in the room's queue (matrix.queues), and deleted once
handled; a restart resumes them. Decryption never waits: an event whose Megolm key has not come
yet is left in place and looked at again when the key arrives (``wait_for_session``) or when its
time is up (``undecryptable_after``): then its sender is told, never left in silence.

Order. Within a room, rows are handled in arrival order, except that a row stuck on a key (or
on a retry) holds back only the later rows *of the same sender* in that room, up to the bound:
one person's messages are mailed in the order they wrote them, while a missing key never
delays other rooms or other people.

Exactly once. A row of a transaction that is still being handled is not touched until that
transaction is recorded as done; at start-up, rows of a transaction that never was are dropped,
because Synapse sends that transaction again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mautrix.errors import DecryptionError, SessionNotFound
from mautrix.types import (
    EncryptedEvent,
    Event,
    EventID,
    EventType,
    RedactionEvent,
    RoomID,
    UserID,
)
from mautrix.util.async_db import Database

from ..db import TxnLog
from ..metrics import DECRYPTION_FAILURES
from ..worker import backoff_ms, now_ms
from .appservice import IncomingTransaction, MustRetry, current_transaction
from .queues import RoomQueues

DEFAULT_UNDECRYPTABLE_AFTER_SECONDS = 300.0
# A handler that keeps crashing on a row is retried with backoff this many times, then dropped
# (logged with the event ID): a poisoned row must not hold back its sender for ever.
MAX_ATTEMPTS = 6
RETRY_CAP_MS = 5 * 60 * 1000
# When the database fails mid-drain, look at the room again this soon.
DB_RETRY_MS = 5000
# How often the IDs of handled events past the transaction log's retention are forgotten.
PRUNE_EVERY_MS = 3600 * 1000

Decrypt = Callable[[EncryptedEvent], Awaitable[Event]]
Handle = Callable[[Event], Awaitable[None]]
TellUndecryptable = Callable[[RoomID, UserID, EventID], Awaitable[None]]
WaitForSession = Callable[[RoomID, str, float], Awaitable[bool]]
RequestKey = Callable[[EncryptedEvent], Awaitable[None]]
# A room key normally follows its event within a second. One still missing after this long was
# probably lost (Synapse drops the to-device messages of transactions it could not deliver while
# the bridge was down): ask the sender's devices for it.
KEY_REQUEST_AFTER_SECONDS = 10.0


@dataclass
class InboxRow:
    id: int
    room_id: RoomID
    event_id: EventID
    sender: UserID
    session_id: str | None
    txn_id: str
    raw: str
    received_at: int
    attempts: int
    next_try_at: int

    def event(self) -> Event:
        evt = Event.deserialize(json.loads(self.raw))
        # As mautrix's handle_matrix_event classifies it: these are never state events.
        evt.type = evt.type.with_class(EventType.Class.MESSAGE)
        return evt


class InboxStore:
    COLUMNS = (
        "id, room_id, event_id, sender, session_id, txn_id, raw, received_at, attempts, "
        "next_try_at"
    )

    def __init__(self, db: Database) -> None:
        self.db = db

    async def add(self, evt: Event, txn_id: str) -> bool:
        """Record an event; False when it was handled before (sent again, new transaction)."""
        if await self.db.fetchval(
            "SELECT 1 FROM matrix_inbox_done WHERE event_id=$1", evt.event_id
        ) is not None:
            return False
        session_id = getattr(evt.content, "session_id", None) if isinstance(
            evt, EncryptedEvent
        ) else None
        # The event as it came (mautrix keeps unknown keys on serialize). A replayed event is
        # the same row, never a second one.
        await self.db.execute(
            "INSERT INTO matrix_inbox (event_id, room_id, sender, session_id, txn_id, raw, "
            "received_at) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
            evt.event_id, evt.room_id, evt.sender, session_id, txn_id,
            json.dumps(evt.serialize()), now_ms(),
        )
        return True

    async def finish(self, row_id: int, event_id: EventID) -> None:
        """The row is dealt with: gone, and its event never taken in again."""
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM matrix_inbox WHERE id=$1", row_id)
            await conn.execute(
                "INSERT INTO matrix_inbox_done (event_id, done_at) VALUES ($1, $2) "
                "ON CONFLICT (event_id) DO NOTHING",
                event_id, now_ms(),
            )

    async def prune_done(self) -> None:
        cutoff = now_ms() - TxnLog.RETENTION_MS
        await self.db.execute("DELETE FROM matrix_inbox_done WHERE done_at < $1", cutoff)

    async def forget(self, room_id: RoomID, event_id: EventID) -> bool:
        """Drop a pending row (its event was redacted before it could be handled)."""
        found = await self.db.fetchval(
            "SELECT id FROM matrix_inbox WHERE room_id=$1 AND event_id=$2", room_id, event_id
        )
        if found is not None:
            await self.finish(found, event_id)
        return found is not None

    async def rows(self, room_id: RoomID) -> list[InboxRow]:
        records = await self.db.fetch(
            f"SELECT {self.COLUMNS} FROM matrix_inbox WHERE room_id=$1 ORDER BY id", room_id
        )
        return [InboxRow(**dict(r)) for r in records]

    async def rooms(self) -> list[RoomID]:
        return [r["room_id"] for r in await self.db.fetch(
            "SELECT DISTINCT room_id FROM matrix_inbox"
        )]

    async def delete(self, row_id: int) -> None:
        await self.db.execute("DELETE FROM matrix_inbox WHERE id=$1", row_id)

    async def postpone(self, row_id: int, attempts: int, next_try_at: int) -> None:
        await self.db.execute(
            "UPDATE matrix_inbox SET attempts=$2, next_try_at=$3 WHERE id=$1",
            row_id, attempts, next_try_at,
        )

    async def drop_unfinished(self) -> int:
        """Rows of transactions never recorded as done: Synapse resends those transactions.

        Only rows well inside the transaction log's retention (half of it) can be told apart:
        an older transaction id may have been pruned after it was marked, so those are kept.
        """
        cutoff = now_ms() - TxnLog.RETENTION_MS // 2
        rows = await self.db.fetch(
            "SELECT id FROM matrix_inbox WHERE txn_id <> '' AND received_at > $1 AND txn_id "
            "NOT IN (SELECT txn_id FROM appservice_txn)",
            cutoff,
        )
        for r in rows:
            await self.delete(r["id"])
        return len(rows)


class Inbox:
    def __init__(
        self,
        store: InboxStore,
        queues: RoomQueues,
        *,
        decrypt: Decrypt,
        handle: Handle,
        tell_undecryptable: TellUndecryptable,
        wait_for_session: WaitForSession,
        undecryptable_after_seconds: float = DEFAULT_UNDECRYPTABLE_AFTER_SECONDS,
        request_key: RequestKey | None = None,
    ) -> None:
        self.store = store
        self._request_key = request_key
        self.queues = queues
        self._decrypt = decrypt
        self._handle = handle
        self._tell_undecryptable = tell_undecryptable
        self._wait_for_session = wait_for_session
        self.undecryptable_after_ms = int(undecryptable_after_seconds * 1000)
        self.log = logging.getLogger("bridge.mx.inbox")
        self._open: dict[str, IncomingTransaction] = {}  # transactions whose rows must wait
        self._queued: dict[RoomID, IncomingTransaction | None] = {}  # drains not yet started
        self._timers: dict[RoomID, tuple[int, asyncio.TimerHandle]] = {}
        self._watching: dict[tuple[RoomID, str], asyncio.Task[None]] = {}
        self.resumed = False
        self._resumed_at = 0
        self._pruned_at = 0

    async def start(self) -> None:
        """Resume what an earlier run left; idempotent."""
        if self.resumed:
            return
        self.resumed = True
        # Keys for events that waited while the bridge was down come in the transactions that
        # follow the restart: the bound runs from the restart for those.
        self._resumed_at = now_ms()
        await self._prune()
        dropped = await self.store.drop_unfinished()
        if dropped:
            self.log.info("Dropped %d events of unfinished transactions (resent by Synapse)",
                          dropped)
        for room_id in await self.store.rooms():
            self.schedule(room_id)

    async def stop(self) -> None:
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._watching.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def record(self, evt: Event) -> None:
        """Called while dispatching a transaction: the row exists before the 200."""
        txn = current_transaction()
        try:
            if isinstance(evt, RedactionEvent) and evt.redacts:
                # A message deleted while still waiting (say, for its key) is never mailed, and
                # its sender is not told that it could not be read.
                if await self.store.forget(evt.room_id, evt.redacts):
                    self.log.getChild(evt.room_id).info(
                        "%s was redacted before it was handled", evt.redacts
                    )
            await self.store.add(evt, txn.txn_id if txn else "")
        except Exception as e:
            raise MustRetry(f"could not record {evt.event_id}") from e
        if txn is not None and not txn.done.is_set():
            self._open[txn.txn_id] = txn
        self.schedule(evt.room_id, txn)

    def schedule(self, room_id: RoomID, after: IncomingTransaction | None = None) -> None:
        """Look at a room's rows in its queue (after `after` is recorded as done)."""
        if room_id in self._queued and self._queued[room_id] is after:
            return  # one drain per room and transaction is enough
        self._queued[room_id] = after
        self.queues.submit(room_id, self._drain(room_id, after))

    async def _prune(self) -> None:
        self._pruned_at = now_ms()
        await self.store.prune_done()

    def _is_open(self, txn_id: str) -> bool:
        txn = self._open.get(txn_id)
        if txn is not None and txn.done.is_set():
            del self._open[txn_id]
            return False
        return txn is not None

    async def _drain(self, room_id: RoomID, after: IncomingTransaction | None) -> None:
        if after is not None:
            await after.done.wait()
        if self._queued.get(room_id) is after:
            del self._queued[room_id]
        try:
            if now_ms() - self._pruned_at > PRUNE_EVERY_MS:
                await self._prune()
            wake_at = await self._drain_rows(room_id)
        except Exception:
            self.log.getChild(room_id).exception("Inbox round failed; trying again soon")
            wake_at = now_ms() + DB_RETRY_MS
        if wake_at is not None:
            self._wake_at(room_id, wake_at)

    async def _drain_rows(self, room_id: RoomID) -> int | None:
        """Handle every row that may go now; returns when to look again, if ever."""
        held: set[UserID] = set()  # senders with an earlier row still waiting
        wake_at: int | None = None
        now = now_ms()
        for row in await self.store.rows(room_id):
            if self._is_open(row.txn_id):
                continue  # its own drain runs once its transaction is recorded
            if row.sender in held:
                continue
            again = row.next_try_at if row.next_try_at > now else await self._process(row, now)
            if again is not None:
                held.add(row.sender)
                wake_at = again if wake_at is None else min(wake_at, again)
        return wake_at

    async def _process(self, row: InboxRow, now: int) -> int | None:
        """Handle one row: None when it is done (and deleted), else when to try again."""
        log = self.log.getChild(row.room_id)
        try:
            evt = row.event()
        except Exception:
            log.exception("Dropping %s: its stored form cannot be read", row.event_id)
            await self.store.finish(row.id, row.event_id)
            return None
        if isinstance(evt, EncryptedEvent):
            try:
                evt = await self._decrypt(evt)
            except SessionNotFound as e:
                give_up_at = max(row.received_at, self._resumed_at) + self.undecryptable_after_ms
                if now < give_up_at:
                    self._watch(row.room_id, str(e.session_id), give_up_at, evt)
                    return give_up_at
                log.warning("No key for %s from %s after %d s", row.event_id, row.sender,
                            self.undecryptable_after_ms // 1000)
                DECRYPTION_FAILURES.labels("no_key").inc()
                return await self._give_up(row, now)
            except DecryptionError as e:
                log.warning("Cannot decrypt %s from %s: %s", row.event_id, row.sender, e)
                DECRYPTION_FAILURES.labels("error").inc()
                return await self._give_up(row, now)
        try:
            await self._handle(evt)
        except Exception:
            log.exception("Failed to handle %s from %s (attempt %d)", row.event_id, row.sender,
                          row.attempts + 1)
            return await self._retry_later(row, now)
        await self.store.finish(row.id, row.event_id)
        return None

    async def _give_up(self, row: InboxRow, now: int) -> int | None:
        try:
            await self._tell_undecryptable(row.room_id, row.sender, row.event_id)
        except Exception:
            self.log.getChild(row.room_id).exception(
                "Could not tell %s that %s was unreadable", row.sender, row.event_id
            )
            return await self._retry_later(row, now)
        await self.store.finish(row.id, row.event_id)
        return None

    async def _retry_later(self, row: InboxRow, now: int) -> int | None:
        attempts = row.attempts + 1
        if attempts >= MAX_ATTEMPTS:
            self.log.getChild(row.room_id).error(
                "Giving up on %s from %s after %d attempts", row.event_id, row.sender, attempts
            )
            await self.store.finish(row.id, row.event_id)
            return None
        next_try_at = now + backoff_ms(attempts, RETRY_CAP_MS)
        await self.store.postpone(row.id, attempts, next_try_at)
        return next_try_at

    def _wake_at(self, room_id: RoomID, at: int) -> None:
        current = self._timers.get(room_id)
        if current is not None:
            if current[0] <= at:
                return
            current[1].cancel()
        delay = max(0.0, (at - now_ms()) / 1000)

        def fire() -> None:
            self._timers.pop(room_id, None)
            self.schedule(room_id)

        self._timers[room_id] = (at, asyncio.get_running_loop().call_later(delay, fire))

    def _watch(
        self, room_id: RoomID, session_id: str, until: int, evt: EncryptedEvent | None = None
    ) -> None:
        """Look at the room again as soon as the bot's machine receives this session; ask the
        sender's devices for it when it does not come by itself."""
        key = (room_id, session_id)
        if key in self._watching:
            return

        async def watch() -> None:
            try:
                first = min(KEY_REQUEST_AFTER_SECONDS, max(0.0, (until - now_ms()) / 1000))
                if await self._wait_for_session(room_id, session_id, first):
                    self.schedule(room_id)
                    return
                if evt is not None and self._request_key is not None:
                    try:
                        await self._request_key(evt)
                    except Exception:
                        self.log.getChild(room_id).exception(
                            "Could not ask %s for the key of %s", evt.sender, evt.event_id
                        )
                if await self._wait_for_session(
                    room_id, session_id, max(0.0, (until - now_ms()) / 1000)
                ):
                    self.schedule(room_id)
            finally:
                self._watching.pop(key, None)

        self._watching[key] = asyncio.create_task(watch())
