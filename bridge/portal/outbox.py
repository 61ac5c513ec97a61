"""The outbox: mail written in Matrix waits here until the outbound worker has sent it.

The composed mail (`raw`) is sealed with the pickle key while it waits, so a copy of the database
alone does not reveal what users wrote; it is cleared once the mail is sent, failed or withdrawn.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from mautrix.util.async_db import Database

from ..crypto.sealed import UnsealError, is_sealed_bytes, seal_bytes, unseal_bytes
from ..worker import now_ms

SEAL_PURPOSE = "outbox"
FINISHED = ("sent", "failed", "cancelled")


@dataclass
class OutboxRow:
    event_id: str
    room_id: str
    owner: str
    thread_root: str
    message_id: str
    mail_from: str
    recipients: list[str]
    raw: bytes = field(repr=False)  # the mail itself: never in a log line
    attempts: int
    created_at: int


@dataclass(frozen=True)
class SentRecently:
    """One mail counted by the sending rate limit: when it was queued, to how many people."""

    created_at: int
    recipients: int


class Outbox:
    def __init__(self, db: Database, pickle_key: str | None = None) -> None:
        self.db = db
        # None only until app.py passes encryption.pickle_key: new rows are then stored unsealed.
        # (An outbox that only answers knows_message_id needs no key.)
        self.pickle_key = pickle_key
        self.log = logging.getLogger("bridge.portal.outbox")
        self._warned = False

    def _seal(self, raw: bytes) -> bytes:
        if self.pickle_key is None:
            if not self._warned:
                self.log.warning("Outbox without a pickle key: queued mail is stored unsealed")
                self._warned = True
            return raw
        return seal_bytes(self.pickle_key, SEAL_PURPOSE, raw)

    def _unseal(self, blob: bytes) -> bytes:
        # Rows queued before sealing existed are plain RFC 5322 text: unseal_bytes passes them.
        if self.pickle_key is None:
            if is_sealed_bytes(blob):
                raise UnsealError("sealed, and this outbox has no pickle key")
            return bytes(blob)
        return unseal_bytes(self.pickle_key, SEAL_PURPOSE, blob)

    async def add(
        self,
        *,
        event_id: str,
        room_id: str,
        owner: str,
        thread_root: str,
        message_id: str,
        mail_from: str,
        recipients: list[str],
        raw: bytes,
    ) -> bool:
        """Queue a mail; False when this event was already queued (a replayed event)."""
        now = now_ms()
        result = await self.db.fetchval(
            "INSERT INTO outbox (event_id, room_id, owner, thread_root, message_id, mail_from, "
            "recipients, raw, next_attempt, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) "
            "ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            event_id,
            room_id,
            owner,
            thread_root,
            message_id,
            mail_from,
            json.dumps(recipients),
            self._seal(raw),
            now,
        )
        return result is not None

    async def get(self, event_id: str) -> tuple[str, str] | None:
        """(state, message_id) of an event's mail, if it was mailed."""
        row = await self.db.fetchrow(
            "SELECT state, message_id FROM outbox WHERE event_id=$1", event_id
        )
        return (row["state"], row["message_id"]) if row else None

    async def sent_since(self, owner: str, since_ms: int) -> list[SentRecently]:
        """The owner's mails since a moment, oldest first, with their number of recipients: the
        rate limit counts people mailed, so one mail to 50 weighs as much as 50 mails."""
        rows = await self.db.fetch(
            "SELECT created_at, recipients FROM outbox WHERE owner=$1 AND created_at >= $2 "
            "AND state != 'cancelled' ORDER BY created_at",
            owner,
            since_ms,
        )
        return [SentRecently(r["created_at"], len(json.loads(r["recipients"]))) for r in rows]

    async def knows_message_id(self, message_id: str) -> bool:
        """Whether the bridge generated this Message-ID for a mail it queued (with or without
        the <>): mail that comes back with it is our own, looping."""
        value = message_id.strip().removeprefix("<").removesuffix(">")
        if not value:
            return False
        found = await self.db.fetchval(
            "SELECT 1 FROM outbox WHERE message_id=$1 LIMIT 1", value
        )
        return found is not None

    async def prune(self, older_than_ms: int) -> int:
        """Delete finished rows (sent, failed, cancelled) queued before older_than_ms (ms since
        the epoch, as the retention job passes it); the number deleted. Pending and in-flight
        mail always stays. Keep the retention above the rate window (rows count for the rate
        limit) and the appservice transaction retention (a row is what stops a replayed event
        from being mailed twice)."""
        deleted = await self.db.fetch(
            "DELETE FROM outbox WHERE created_at < $1 AND state IN ($2, $3, $4) "
            "RETURNING event_id",
            older_than_ms,
            *FINISHED,
        )
        return len(deleted)

    async def due(self, limit: int = 20) -> list[OutboxRow]:
        rows = await self.db.fetch(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt <= $1 "
            "ORDER BY created_at LIMIT $2",
            now_ms(),
            limit,
        )
        due = []
        for r in rows:
            try:
                raw = self._unseal(r["raw"])
            except UnsealError:
                # Sealed under another pickle key: it can never be read, so retrying is useless.
                self.log.error("Queued mail %s cannot be unsealed; giving up", r["event_id"])
                await self.finish(r["event_id"], "failed", "cannot unseal: pickle key changed")
                continue
            due.append(
                OutboxRow(
                    event_id=r["event_id"],
                    room_id=r["room_id"],
                    owner=r["owner"],
                    thread_root=r["thread_root"],
                    message_id=r["message_id"],
                    mail_from=r["mail_from"],
                    recipients=json.loads(r["recipients"]),
                    raw=raw,
                    attempts=r["attempts"],
                    created_at=r["created_at"],
                )
            )
        return due

    async def next_due_at(self) -> int | None:
        return await self.db.fetchval(
            "SELECT MIN(next_attempt) FROM outbox WHERE state='pending'"
        )

    async def claim(self, event_id: str) -> bool:
        """Take a due mail for sending; from here on a redaction can no longer withdraw it."""
        result = await self.db.fetchval(
            "UPDATE outbox SET state = 'sending' WHERE event_id = $1 AND state = 'pending' "
            "RETURNING event_id",
            event_id,
        )
        return result is not None

    async def recover(self) -> None:
        """After a crash mid-send: try those again (the relay may or may not have it)."""
        await self.db.execute("UPDATE outbox SET state = 'pending' WHERE state = 'sending'")

    async def retry_later(self, event_id: str, delay_ms: int, error: str) -> None:
        await self.db.execute(
            "UPDATE outbox SET state = 'pending', attempts = attempts + 1, next_attempt = $2, "
            "last_error = $3 WHERE event_id = $1",
            event_id,
            now_ms() + delay_ms,
            error[:1000],
        )

    async def finish(self, event_id: str, state: str, error: str = "") -> None:
        """sent | failed | cancelled. The mail text is cleared: only the bookkeeping stays."""
        await self.db.execute(
            "UPDATE outbox SET state = $2, last_error = $3, raw = $4 WHERE event_id = $1",
            event_id,
            state,
            error[:1000] or None,
            b"",
        )

    async def cancel(self, event_id: str) -> bool:
        """Withdraw a mail that has not left yet; False when it is already sent or unknown."""
        result = await self.db.fetchval(
            "UPDATE outbox SET state = 'cancelled', raw = $2 "
            "WHERE event_id = $1 AND state = 'pending' RETURNING event_id",
            event_id,
            b"",
        )
        return result is not None
