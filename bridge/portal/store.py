"""Rows the hub keeps: portals, ghosts, and the Message-ID ↔ event map.

What a mail says never stays here in plaintext: the subject, Reply-To, Cc and References a thread
needs are sealed (AES-GCM, :mod:`bridge.crypto.sealed`) with a key derived from
``encryption.pickle_key``, and so is the subject given with the `new` command. Message-IDs, event
IDs and room IDs stay plain: they are what rows are looked up by.

Rows written before sealing existed have a NULL sealed column and their plain columns filled;
they are read as they are, and :meth:`MessageMap.seal_plain_rows` /
:meth:`PortalStore.seal_plain_rows` seal them at start-up (a schema upgrade cannot: it has no key).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mautrix.util.async_db import Database

from ..crypto.sealed import seal, unseal

# Domain separation for the sealing keys: one purpose per kind of sealed value.
MAIL_SEAL_PURPOSE = "mail-message"
SUBJECT_SEAL_PURPOSE = "portal-subject"
# Legacy rows are sealed this many at a time: one transaction each, so start-up never holds
# the database for long and an interrupted run resumes where it stopped.
SEAL_BATCH = 500

log = logging.getLogger("bridge.portal.store")


def _warn_unsealed(store: str, pickle_key: str | None) -> None:
    if not pickle_key:
        # Only while the hub is not yet handed the key: say so loudly rather than quietly.
        log.warning("%s has no pickle key: mail metadata is stored in plaintext", store)


@dataclass
class PortalRow:
    id: str
    owner: str
    conv_key: str
    kind: str  # "dm" | "group" | "list"
    room_id: str | None
    name: str
    participants: list[str]
    # What the user typed with `new`: content, so kept out of reprs (and logs).
    subject: str = field(default="", repr=False)


@dataclass
class MailMessageRow:
    room_id: str
    message_id: str
    event_id: str
    thread_root: str
    # The fields below are what the mail said: sealed at rest, and kept out of reprs (and logs).
    subject: str = field(repr=False)
    # Where a reply goes (Reply-To or From).
    reply_to: list[str] = field(default_factory=list, repr=False)
    # The other participants, for a reply's Cc.
    cc: list[str] = field(default_factory=list, repr=False)
    # This mail's References chain.
    refs: list[str] = field(default_factory=list, repr=False)

    def sealed_fields(self) -> str:
        """The content fields as one JSON text, the plaintext that gets sealed."""
        return json.dumps(
            {"subject": self.subject, "reply_to": self.reply_to, "cc": self.cc, "refs": self.refs}
        )


class PortalStore:
    def __init__(self, db: Database, pickle_key: str | None = None) -> None:
        """``pickle_key`` seals the `new` subject; None stores it plain (legacy, tests only)."""
        self.db = db
        self._pickle_key = pickle_key
        _warn_unsealed("PortalStore", pickle_key)

    def _seal(self, subject: str) -> str | None:
        return seal(self._pickle_key, SUBJECT_SEAL_PURPOSE, subject) if self._pickle_key else None

    def _row(self, record: Any) -> PortalRow:
        sealed = record["sealed_subject"]
        subject = (
            unseal(self._pickle_key, SUBJECT_SEAL_PURPOSE, sealed)
            if sealed is not None
            else record["subject"]  # written before sealing
        )
        return PortalRow(
            id=record["id"],
            owner=record["owner"],
            conv_key=record["conv_key"],
            kind=record["kind"],
            room_id=record["room_id"],
            name=record["name"],
            participants=json.loads(record["participants"]),
            subject=subject,
        )

    async def by_key(self, owner: str, conv_key: str) -> PortalRow | None:
        record = await self.db.fetchrow(
            "SELECT * FROM portal WHERE owner=$1 AND conv_key=$2", owner, conv_key
        )
        return self._row(record) if record else None

    async def by_room(self, room_id: str) -> PortalRow | None:
        record = await self.db.fetchrow("SELECT * FROM portal WHERE room_id=$1", room_id)
        return self._row(record) if record else None

    async def get_or_create(
        self,
        owner: str,
        conv_key: str,
        kind: str,
        name: str,
        participants: list[str],
        subject: str = "",
    ) -> PortalRow:
        sealed = self._seal(subject)
        await self.db.execute(
            "INSERT INTO portal "
            "(id, owner, conv_key, kind, name, participants, subject, sealed_subject) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (owner, conv_key) DO NOTHING",
            secrets.token_hex(8),
            owner,
            conv_key,
            kind,
            name,
            json.dumps(participants),
            "" if sealed is not None else subject,
            sealed,
        )
        row = await self.by_key(owner, conv_key)
        assert row is not None
        return row

    async def set_room(self, portal_id: str, room_id: str | None) -> None:
        await self.db.execute("UPDATE portal SET room_id=$1 WHERE id=$2", room_id, portal_id)

    async def set_subject(self, portal_id: str, subject: str) -> None:
        sealed = self._seal(subject)
        await self.db.execute(
            "UPDATE portal SET subject=$1, sealed_subject=$2 WHERE id=$3",
            "" if sealed is not None else subject,
            sealed,
            portal_id,
        )

    async def seal_plain_rows(self) -> int:
        """Seal the subjects of portals written before sealing existed; how many were sealed."""
        if not self._pickle_key:
            return 0
        records = await self.db.fetch(
            "SELECT id, subject FROM portal WHERE sealed_subject IS NULL"
        )
        # Portals are few (one per conversation): one transaction is enough.
        async with self.db.acquire() as conn, conn.transaction():
            for record in records:
                await conn.execute(
                    "UPDATE portal SET subject='', sealed_subject=$1 WHERE id=$2",
                    self._seal(record["subject"]),
                    record["id"],
                )
        if records:
            log.info("Sealed the subjects of %d portals written by an older version", len(records))
        return len(records)


class GhostStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def displayname(self, user_id: str) -> str | None:
        return await self.db.fetchval("SELECT displayname FROM ghost WHERE user_id=$1", user_id)

    async def put(self, user_id: str, address: str, displayname: str) -> None:
        await self.db.execute(
            "INSERT INTO ghost (user_id, address, displayname) VALUES ($1, $2, $3) "
            "ON CONFLICT (user_id) DO UPDATE SET displayname=excluded.displayname",
            user_id,
            address,
            displayname,
        )


class MessageMap:
    def __init__(self, db: Database, pickle_key: str | None = None) -> None:
        """``pickle_key`` seals thread metadata; None stores it plain (legacy, tests only)."""
        self.db = db
        self._pickle_key = pickle_key
        _warn_unsealed("MessageMap", pickle_key)

    def _row(self, record: Any) -> MailMessageRow:
        """A row from a record, sealed or (written before sealing) plain."""
        ids = dict(
            room_id=record["room_id"],
            message_id=record["message_id"],
            event_id=record["event_id"],
            thread_root=record["thread_root"],
        )
        sealed = record["sealed"]
        if sealed is None:
            return MailMessageRow(
                **ids,
                subject=record["subject"],
                reply_to=record["reply_to"].split(),
                cc=record["cc"].split(),
                refs=record["refs"].split(),
            )
        fields = json.loads(unseal(self._pickle_key, MAIL_SEAL_PURPOSE, sealed))
        return MailMessageRow(**ids, **fields)

    def _columns(self, row: MailMessageRow) -> tuple[str, str, str, str, str | None]:
        """(subject, reply_to, cc, refs, sealed) as stored: the plain ones empty when sealed."""
        if self._pickle_key:
            return "", "", "", "", seal(self._pickle_key, MAIL_SEAL_PURPOSE, row.sealed_fields())
        return row.subject, " ".join(row.reply_to), " ".join(row.cc), " ".join(row.refs), None

    async def put(self, row: MailMessageRow) -> None:
        await self.db.execute(
            "INSERT INTO mail_message (room_id, message_id, event_id, thread_root, subject, "
            "reply_to, cc, refs, sealed, created_at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
            "ON CONFLICT (room_id, message_id) DO NOTHING",
            row.room_id,
            row.message_id,
            row.event_id,
            row.thread_root,
            *self._columns(row),
            time.time_ns() // 1000,
        )

    async def by_event(self, room_id: str, event_id: str) -> MailMessageRow | None:
        record = await self.db.fetchrow(
            "SELECT * FROM mail_message WHERE room_id=$1 AND event_id=$2", room_id, event_id
        )
        return self._row(record) if record else None

    async def latest_in_thread(self, room_id: str, thread_root: str) -> MailMessageRow | None:
        """The newest mail of a thread: what a message sent in the thread answers."""
        record = await self.db.fetchrow(
            "SELECT * FROM mail_message WHERE room_id=$1 AND thread_root=$2 "
            "ORDER BY created_at DESC LIMIT 1",
            room_id,
            thread_root,
        )
        return self._row(record) if record else None

    async def find(self, room_id: str, message_ids: Iterable[str]) -> MailMessageRow | None:
        """The first of message_ids (in the order given) that this room knows."""
        for message_id in message_ids:
            record = await self.db.fetchrow(
                "SELECT * FROM mail_message WHERE room_id=$1 AND message_id=$2",
                room_id,
                message_id,
            )
            if record:
                return self._row(record)
        return None

    async def rooms_knowing(self, owner: str, message_ids: Iterable[str]) -> str | None:
        """A portal room of owner that knows one of message_ids: replies stay in their room."""
        for message_id in message_ids:
            # Served by the mail_message_message_id index (schema v8).
            room_id = await self.db.fetchval(
                "SELECT m.room_id FROM mail_message m JOIN portal p ON p.room_id = m.room_id "
                "WHERE p.owner=$1 AND m.message_id=$2 LIMIT 1",
                owner,
                message_id,
            )
            if room_id:
                return room_id
        return None

    async def seal_plain_rows(self) -> int:
        """Seal rows written before sealing existed; how many were sealed.

        Batched, each batch its own transaction: a big old map is sealed without holding the
        database for long, and an interrupted run picks up where it stopped.
        """
        if not self._pickle_key:
            return 0
        total, after = 0, ("", "")
        # Walked in primary-key order from where the last batch ended: each batch is an index
        # range, not a scan of the table (a big old map would otherwise cost quadratic time).
        while records := await self.db.fetch(
            "SELECT * FROM mail_message WHERE sealed IS NULL AND (room_id, message_id) > ($1, $2) "
            "ORDER BY room_id, message_id LIMIT $3",
            *after,
            SEAL_BATCH,
        ):
            after = (records[-1]["room_id"], records[-1]["message_id"])
            rows = [self._row(record) for record in records]
            async with self.db.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "UPDATE mail_message SET subject=$3, reply_to=$4, cc=$5, refs=$6, "
                    "sealed=$7 WHERE room_id=$1 AND message_id=$2",
                    [(row.room_id, row.message_id, *self._columns(row)) for row in rows],
                )
            total += len(records)
        if total:
            log.info("Sealed %d mail records written by an older version", total)
        return total

    async def latest_in_room(self, room_id: str) -> MailMessageRow | None:
        """The newest mail of a room, whichever direction (received, or sent from Matrix): what
        a message typed in the room's main timeline continues."""
        message_id = await self.db.fetchval(
            "SELECT message_id FROM mail_message WHERE room_id=$1 "
            "ORDER BY created_at DESC LIMIT 1",
            room_id,
        )
        # Read through find() so the row is decoded exactly as every other lookup decodes it.
        return await self.find(room_id, [message_id]) if message_id else None
