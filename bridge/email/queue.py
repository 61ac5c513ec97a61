"""The durable inbound queue. SMTP answers 250 only after `enqueue` has committed.

The raw mail is sealed at rest (AES-GCM under a key derived from ``encryption.pickle_key``): mail
for someone who has not logged in yet may wait here for weeks, and a copy of the database must
not be a copy of their mail.

A delivery is ``pending`` (due at ``next_attempt``), ``held`` (its reader has no device that could
decrypt it yet: it waits, without expiring, until one appears), ``delivered`` or ``failed``.
In this module ``queue_id`` is our id of a queued message; the table column keeps its historic
name ``message_id``, which elsewhere in the bridge means the RFC 5322 Message-ID.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field

from mautrix.util.async_db import Connection, Database

from ..crypto.sealed import seal_bytes, unseal_bytes
from ..worker import now_ms

SEAL_PURPOSE = "inbound-raw"


class _Sequence:
    """Strictly increasing arrival order (µs clock, never repeating, even within one tick)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(time.time_ns() // 1000, self._last + 1)
        return self._last


@dataclass
class QueuedRecipient:
    user_id: str
    recipient: str
    tag: str


@dataclass
class DueDelivery:
    queue_id: str
    user_id: str
    recipient: str
    tag: str
    attempts: int
    received_at: int
    order_key: str
    mail_from: str
    auth: dict | None
    raw: bytes = field(repr=False)  # the mail itself: never in a log line


class InboundQueue:
    def __init__(self, db: Database, pickle_key: str | None = None) -> None:
        """``pickle_key`` seals raw mail at rest; None only in tests of the queue itself."""
        self.db = db
        self._pickle_key = pickle_key
        self._seq = _Sequence()

    def _seal(self, raw: bytes) -> bytes:
        return seal_bytes(self._pickle_key, SEAL_PURPOSE, raw) if self._pickle_key else raw

    def _unseal(self, blob: bytes) -> bytes:
        # Rows queued before sealing existed are plain and read back as they are.
        return unseal_bytes(self._pickle_key, SEAL_PURPOSE, blob) if self._pickle_key else blob

    async def enqueue(
        self,
        *,
        raw: bytes,
        mail_from: str,
        peer: str,
        helo: str,
        auth: dict | None,
        recipients: list[QueuedRecipient],
        order_key: str = "",
    ) -> str:
        """Store the message and one delivery per local user, in one transaction.

        Mail with the same `order_key` (the correspondent, or the list) is delivered to each
        user in arrival order; mail with different keys may be delivered in parallel.
        """
        queue_id = secrets.token_hex(12)
        received = now_ms()
        digest = self._digest(raw)
        async with self.db.acquire() as conn, conn.transaction():
            fresh = await self._first_time(conn, digest, recipients, queue_id, received)
            if recipients and not fresh:
                # A resend of mail we already took (the sender never saw our 250): answer as
                # before, with the queue id it got then, and post nothing twice.
                return await conn.fetchval(
                    "SELECT queue_id FROM inbound_seen WHERE user_id=$1 AND digest=$2",
                    recipients[0].user_id,
                    digest,
                )
            recipients = fresh
            await conn.execute(
                "INSERT INTO inbound_message "
                "(id, seq, order_key, received_at, mail_from, peer, helo, auth, raw, size) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                queue_id,
                self._seq.next(),
                order_key,
                received,
                mail_from,
                peer,
                helo,
                json.dumps(auth) if auth is not None else None,
                self._seal(raw),
                len(raw),
            )
            for rcpt in recipients:
                await conn.execute(
                    "INSERT INTO inbound_delivery (message_id, user_id, recipient, tag, "
                    "next_attempt, due_since) VALUES ($1, $2, $3, $4, $5, $5) "
                    "ON CONFLICT (message_id, user_id) DO NOTHING",
                    queue_id,
                    rcpt.user_id,
                    rcpt.recipient,
                    rcpt.tag,
                    received,
                )
        return queue_id

    def _digest(self, raw: bytes) -> str:
        """A keyed digest of the raw mail: recognises a resend without storing anything that
        would let someone guess a short mail's text offline."""
        key = hashlib.sha256(f"cloakroom-dedup:{self._pickle_key or ''}".encode()).digest()
        return hmac.new(key, raw, hashlib.sha256).hexdigest()

    @staticmethod
    async def _first_time(
        conn: Connection, digest: str, recipients: list[QueuedRecipient], queue_id: str,
        received: int,
    ) -> list[QueuedRecipient]:
        """The recipients who have not had this exact mail yet (within the retention time)."""
        fresh = []
        for rcpt in recipients:
            taken = await conn.fetchval(
                "INSERT INTO inbound_seen (user_id, digest, queue_id, received_at) "
                "VALUES ($1, $2, $3, $4) ON CONFLICT (user_id, digest) DO NOTHING "
                "RETURNING queue_id",
                rcpt.user_id,
                digest,
                queue_id,
                received,
            )
            if taken is not None:
                fresh.append(rcpt)
        return fresh

    async def prune_seen(self, older_than_ms: int) -> int:
        """Forget which mail was taken once the window for a sender's resend is over."""
        rows = await self.db.fetch(
            "DELETE FROM inbound_seen WHERE received_at < $1 RETURNING digest", older_than_ms
        )
        return len(rows)

    async def due(self, limit: int = 20) -> list[DueDelivery]:
        rows = await self.db.fetch(
            "SELECT d.message_id, d.user_id, d.recipient, d.tag, d.attempts, d.due_since, "
            "m.order_key, m.mail_from, m.auth, m.raw FROM inbound_delivery d "
            "JOIN inbound_message m ON m.id = d.message_id "
            "WHERE d.state = 'pending' AND d.next_attempt <= $1 "
            # A conversation's mail is delivered in arrival order: nothing overtakes a held one.
            "AND NOT EXISTS (SELECT 1 FROM inbound_delivery d2 "
            "  JOIN inbound_message m2 ON m2.id = d2.message_id "
            "  WHERE d2.user_id = d.user_id AND m2.order_key = m.order_key "
            "  AND d2.state = 'pending' AND d2.next_attempt > $1 AND m2.seq < m.seq) "
            "ORDER BY m.seq LIMIT $2",
            now_ms(),
            limit,
        )
        return [
            DueDelivery(
                queue_id=r["message_id"],
                user_id=r["user_id"],
                recipient=r["recipient"],
                tag=r["tag"],
                attempts=r["attempts"],
                # Held mail does not age: the give-up clock starts when it became deliverable.
                received_at=r["due_since"],
                order_key=r["order_key"],
                mail_from=r["mail_from"],
                auth=json.loads(r["auth"]) if r["auth"] else None,
                raw=self._unseal(r["raw"]),
            )
            for r in rows
        ]

    async def next_due_at(self) -> int | None:
        return await self.db.fetchval(
            "SELECT MIN(next_attempt) FROM inbound_delivery WHERE state = 'pending'"
        )

    async def done_parts(self, queue_id: str, user_id: str) -> dict[int, str]:
        rows = await self.db.fetch(
            "SELECT part, event_id FROM delivered_part WHERE message_id=$1 AND user_id=$2",
            queue_id,
            user_id,
        )
        return {r["part"]: r["event_id"] for r in rows}

    async def record_part(self, queue_id: str, user_id: str, part: int, event_id: str) -> None:
        await self.db.execute(
            "INSERT INTO delivered_part (message_id, user_id, part, event_id) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            queue_id,
            user_id,
            part,
            event_id,
        )

    async def retry_later(self, queue_id: str, user_id: str, delay_ms: int, error: str) -> None:
        """Back off one delivery; due() holds the conversation's later mail behind it."""
        next_attempt = now_ms() + delay_ms
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE inbound_delivery SET attempts = attempts + 1, next_attempt = $3, "
                "last_error = $4 WHERE message_id = $1 AND user_id = $2",
                queue_id,
                user_id,
                next_attempt,
                error[:1000],
            )
            # Wake the held ones together with it, so they follow right after.
            await conn.execute(
                "UPDATE inbound_delivery SET next_attempt = $3 "
                "WHERE user_id = $1 AND state = 'pending' AND next_attempt < $3 "
                "AND message_id IN (SELECT id FROM inbound_message WHERE order_key = "
                "(SELECT order_key FROM inbound_message WHERE id = $2))",
                user_id,
                queue_id,
                next_attempt,
            )

    async def finish(self, queue_id: str, user_id: str, state: str, error: str = "") -> None:
        """Mark one delivery done; when none is pending, delete the message and its raw text."""
        async with self.db.acquire() as conn, conn.transaction():
            # next_attempt becomes the moment it finished: a failure is kept for the admin for
            # the retention time counted from then, not from its arrival.
            await conn.execute(
                "UPDATE inbound_delivery SET state = $3, last_error = $4, next_attempt = $5 "
                "WHERE message_id = $1 AND user_id = $2",
                queue_id,
                user_id,
                state,
                error[:1000] or None,
                now_ms(),
            )
            unfinished = await conn.fetchval(
                "SELECT COUNT(*) FROM inbound_delivery "
                "WHERE message_id = $1 AND state IN ('pending', 'held', 'failed')",
                queue_id,
            )
            if not unfinished:
                # Only the Message-ID map and thread metadata outlive delivery, not the mail.
                # A message that failed for someone is kept for the admin: nothing is lost.
                await conn.execute("DELETE FROM inbound_message WHERE id = $1", queue_id)

    async def pending_count(self) -> int:
        return await self.db.fetchval(
            "SELECT COUNT(*) FROM inbound_delivery WHERE state = 'pending'"
        )

    # Mail waiting for its reader's first device -------------------------------------------

    async def hold_user(self, user_id: str) -> int:
        """The user has no device that can decrypt: everything pending for them waits."""
        return await self._count_changed(
            "UPDATE inbound_delivery SET state = 'held' "
            "WHERE user_id = $1 AND state = 'pending' RETURNING message_id",
            user_id,
        )

    async def release_user(self, user_id: str) -> int:
        """A device appeared: their held mail is due now, in arrival order, with fresh backoff."""
        now = now_ms()
        return await self._count_changed(
            "UPDATE inbound_delivery SET state = 'pending', next_attempt = $2, due_since = $2, "
            "attempts = 0 WHERE user_id = $1 AND state = 'held' RETURNING message_id",
            user_id,
            now,
        )

    async def _count_changed(self, query: str, *args: object) -> int:
        return len(await self.db.fetch(query, *args))

    async def held_users(self) -> list[str]:
        rows = await self.db.fetch(
            "SELECT DISTINCT user_id FROM inbound_delivery WHERE state = 'held'"
        )
        return [r["user_id"] for r in rows]

    async def held_usage(self, user_id: str) -> tuple[int, int]:
        """(messages, bytes) waiting for this user's first device: the mailbox's fill level."""
        row = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, COALESCE(SUM(m.size), 0) AS size FROM inbound_delivery d "
            "JOIN inbound_message m ON m.id = d.message_id "
            "WHERE d.user_id = $1 AND d.state = 'held'",
            user_id,
        )
        return int(row["n"]), int(row["size"])

    async def prune_failed(self, older_than_ms: int) -> int:
        """Forget deliveries that failed for good once their retention time is over."""
        async with self.db.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "DELETE FROM inbound_delivery WHERE state = 'failed' AND next_attempt < $1 "
                "RETURNING message_id",
                older_than_ms,
            )
            await conn.execute(
                "DELETE FROM inbound_message WHERE received_at < $1 AND NOT EXISTS "
                "(SELECT 1 FROM inbound_delivery d WHERE d.message_id = inbound_message.id)",
                older_than_ms,
            )
        return len(rows)
