"""The outbox: mail written in Matrix waits here until the outbound worker has sent it."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mautrix.util.async_db import Database

from ..worker import now_ms


@dataclass
class OutboxRow:
    event_id: str
    room_id: str
    owner: str
    thread_root: str
    message_id: str
    mail_from: str
    recipients: list[str]
    raw: bytes
    attempts: int
    created_at: int


class Outbox:
    def __init__(self, db: Database) -> None:
        self.db = db

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
            raw,
            now,
        )
        return result is not None

    async def get(self, event_id: str) -> tuple[str, str] | None:
        """(state, message_id) of an event's mail, if it was mailed."""
        row = await self.db.fetchrow(
            "SELECT state, message_id FROM outbox WHERE event_id=$1", event_id
        )
        return (row["state"], row["message_id"]) if row else None

    async def sent_since(self, owner: str, since_ms: int) -> list[int]:
        """Creation times of the owner's mails since a moment (for the sending rate limit)."""
        rows = await self.db.fetch(
            "SELECT created_at FROM outbox WHERE owner=$1 AND created_at >= $2 "
            "AND state != 'cancelled' ORDER BY created_at",
            owner,
            since_ms,
        )
        return [r["created_at"] for r in rows]

    async def due(self, limit: int = 20) -> list[OutboxRow]:
        rows = await self.db.fetch(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt <= $1 "
            "ORDER BY created_at LIMIT $2",
            now_ms(),
            limit,
        )
        return [
            OutboxRow(
                event_id=r["event_id"],
                room_id=r["room_id"],
                owner=r["owner"],
                thread_root=r["thread_root"],
                message_id=r["message_id"],
                mail_from=r["mail_from"],
                recipients=json.loads(r["recipients"]),
                raw=bytes(r["raw"]),
                attempts=r["attempts"],
                created_at=r["created_at"],
            )
            for r in rows
        ]

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
