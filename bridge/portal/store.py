"""Rows the hub keeps: portals, ghosts, and the Message-ID ↔ event map."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mautrix.util.async_db import Database


@dataclass
class PortalRow:
    id: str
    owner: str
    conv_key: str
    kind: str  # "dm" | "group" | "list"
    room_id: str | None
    name: str
    participants: list[str]
    subject: str = ""


@dataclass
class MailMessageRow:
    room_id: str
    message_id: str
    event_id: str
    thread_root: str
    subject: str
    reply_to: list[str] = field(default_factory=list)  # where a reply goes (Reply-To or From)
    cc: list[str] = field(default_factory=list)  # the other participants, for a reply's Cc
    refs: list[str] = field(default_factory=list)  # this mail's References chain

    @classmethod
    def from_record(cls, record: Any) -> MailMessageRow:
        return cls(
            room_id=record["room_id"],
            message_id=record["message_id"],
            event_id=record["event_id"],
            thread_root=record["thread_root"],
            subject=record["subject"],
            reply_to=record["reply_to"].split(),
            cc=record["cc"].split(),
            refs=record["refs"].split(),
        )


class PortalStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    @staticmethod
    def _row(record: object) -> PortalRow:
        return PortalRow(
            id=record["id"],
            owner=record["owner"],
            conv_key=record["conv_key"],
            kind=record["kind"],
            room_id=record["room_id"],
            name=record["name"],
            participants=json.loads(record["participants"]),
            subject=record["subject"],
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
        await self.db.execute(
            "INSERT INTO portal (id, owner, conv_key, kind, name, participants, subject) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (owner, conv_key) DO NOTHING",
            secrets.token_hex(8),
            owner,
            conv_key,
            kind,
            name,
            json.dumps(participants),
            subject,
        )
        row = await self.by_key(owner, conv_key)
        assert row is not None
        return row

    async def set_room(self, portal_id: str, room_id: str) -> None:
        await self.db.execute("UPDATE portal SET room_id=$1 WHERE id=$2", room_id, portal_id)

    async def set_subject(self, portal_id: str, subject: str) -> None:
        await self.db.execute("UPDATE portal SET subject=$1 WHERE id=$2", subject, portal_id)


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
    def __init__(self, db: Database) -> None:
        self.db = db

    async def put(self, row: MailMessageRow) -> None:
        await self.db.execute(
            "INSERT INTO mail_message (room_id, message_id, event_id, thread_root, subject, "
            "reply_to, cc, refs, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
            "ON CONFLICT (room_id, message_id) DO NOTHING",
            row.room_id,
            row.message_id,
            row.event_id,
            row.thread_root,
            row.subject,
            " ".join(row.reply_to),
            " ".join(row.cc),
            " ".join(row.refs),
            time.time_ns() // 1000,
        )

    async def by_event(self, room_id: str, event_id: str) -> MailMessageRow | None:
        record = await self.db.fetchrow(
            "SELECT * FROM mail_message WHERE room_id=$1 AND event_id=$2", room_id, event_id
        )
        return MailMessageRow.from_record(record) if record else None

    async def latest_in_thread(self, room_id: str, thread_root: str) -> MailMessageRow | None:
        """The newest mail of a thread: what a message sent in the thread answers."""
        record = await self.db.fetchrow(
            "SELECT * FROM mail_message WHERE room_id=$1 AND thread_root=$2 "
            "ORDER BY created_at DESC LIMIT 1",
            room_id,
            thread_root,
        )
        return MailMessageRow.from_record(record) if record else None

    async def find(self, room_id: str, message_ids: Iterable[str]) -> MailMessageRow | None:
        """The first of message_ids (in the order given) that this room knows."""
        for message_id in message_ids:
            record = await self.db.fetchrow(
                "SELECT * FROM mail_message WHERE room_id=$1 AND message_id=$2",
                room_id,
                message_id,
            )
            if record:
                return MailMessageRow.from_record(record)
        return None

    async def rooms_knowing(self, owner: str, message_ids: Iterable[str]) -> str | None:
        """A portal room of owner that knows one of message_ids: replies stay in their room."""
        for message_id in message_ids:
            room_id = await self.db.fetchval(
                "SELECT m.room_id FROM mail_message m JOIN portal p ON p.room_id = m.room_id "
                "WHERE p.owner=$1 AND m.message_id=$2 LIMIT 1",
                owner,
                message_id,
            )
            if room_id:
                return room_id
        return None
