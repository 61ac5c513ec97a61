"""The hub: one conversation ↔ one encrypted room. Mail from the queue arrives here.

The email edge hands over a :class:`MailJob`; the hub finds or creates the portal, posts the mail
as its ghost (text, then every attachment, then notes about unreadable parts), threads it, and
records the Message-ID so later replies — from email or from Matrix — land in the same thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.types import (
    EncryptionAlgorithm,
    EventType,
    Membership,
    RoomEncryptionStateEventContent,
    RoomID,
    UserID,
)
from mautrix.util.async_db import Database

from ..crypto import EncryptedSender, NoReadableDevice
from ..db import BridgeState
from ..formatter import (
    Address,
    ParsedMail,
    describe,
    others_line,
    parse_dsn,
    parse_mail,
    render_message,
)
from ..identifiers import is_local_address, normalize_address
from .ghosts import Ghosts
from .media import upload_encrypted
from .rooms import create_portal_room, ensure_member
from .store import MailMessageRow, MessageMap, PortalRow, PortalStore

# A group mail seats at most this many correspondents' ghosts in its room (each is a Matrix
# user with its own device and identity); the others are named in the text.
MAX_SEATED = 20


@dataclass
class MailJob:
    """One queued mail for one local user, as the email edge hands it to the hub."""

    queue_id: str
    owner: str  # the local Matrix user
    recipient: str  # the address it was sent to
    tag: str  # the +tag of that address, shown to the user
    raw: bytes = field(repr=False)  # the mail itself: never in a log line
    # The sender-authentication marker for the address shown as the author; None (or a None
    # result) when the sender was authenticated.
    warning_for: Callable[[str], str | None] | None
    envelope_from: str
    done_parts: dict[int, str] = field(default_factory=dict)  # part index → event id
    record_part: Callable[[int, str], Awaitable[None]] | None = None
    # proven | failed | unverified for the address shown (AuthVerdict.standing); None: unknown.
    standing_for: Callable[[str], str] | None = None


@dataclass
class Conversation:
    kind: str
    key: str
    name: str
    participants: list[Address]


class PortalManager:
    def __init__(
        self,
        *,
        db: Database,
        bot: IntentAPI,
        ghosts: Ghosts,
        sender: EncryptedSender,
        state_store: PgStateStore,
        email_domain: str,
        collapse_quotes: bool,
        pickle_key: str,
        threads: str = "auto",
    ) -> None:
        self.threads = threads  # email.threads: auto | replies | threads
        self.portals = PortalStore(db, pickle_key)
        self.state = BridgeState(db)
        self.messages = MessageMap(db, pickle_key)
        self.bot = bot
        self.ghosts = ghosts
        self.sender = sender
        self.state_store = state_store
        self.email_domain = email_domain.lower()
        self.collapse_quotes = collapse_quotes
        self.log = logging.getLogger("bridge.portal")
        # Conversations are delivered in parallel; two mails of one new portal must not both
        # create its room.
        self._room_locks: dict[str, asyncio.Lock] = {}

    def is_local(self, address: str) -> bool:
        return is_local_address(address, self.email_domain)

    async def ensure_encrypted(self, room_id: RoomID) -> None:
        """Rooms we make are encrypted; if a portal's encryption is missing, turn it back on."""
        if await self.sender.is_encrypted(self.bot, room_id):
            return
        content = {"algorithm": "m.megolm.v1.aes-sha2"}
        await self.bot.send_state_event(room_id, EventType.ROOM_ENCRYPTION, content)
        await self.state_store.set_encryption_info(
            room_id, RoomEncryptionStateEventContent(algorithm=EncryptionAlgorithm.MEGOLM_V1)
        )
        self.log.warning("Encryption was off in portal %s; turned it back on", room_id)
        await self.notify(
            room_id, "Encryption was off in this conversation, so I turned it back on.", None
        )

    async def owner_left(self, room_id: RoomID, user_id: str) -> None:
        """The owner left (or was banned from) their conversation room: archive it. Nobody
        reads that room any more, so the next mail of the conversation makes a fresh one
        rather than posting into it; the bridge's own users leave it too."""
        portal = await self.portals.by_room(room_id)
        if portal is None or portal.owner != user_id:
            return
        await self.portals.set_room(portal.id, None)
        self.log.info("%s left %s: portal %s archived", user_id, room_id, portal.id)
        for member in await self.state_store.get_members(room_id, memberships=(Membership.JOIN,)):
            if member == self.bot.mxid:
                continue
            if self.ghosts.owns(member):
                await self.ghosts.leave(member, room_id)
        await self.bot.leave_room(room_id, reason="The conversation was left; it is archived")

    async def portal_for_room(self, room_id: RoomID) -> PortalRow | None:
        return await self.portals.by_room(room_id)

    async def notify(
        self, room_id: RoomID, text: str, reply_to: str | None, thread_root: str | None = None
    ) -> None:
        """A notice from the bot, replying to the event it is about (in its thread, where the
        conversation is threaded)."""
        content: dict[str, Any] = {"msgtype": "m.notice", "body": text, "m.mentions": {}}
        if reply_to:
            portal = await self.portals.by_room(room_id)
            if portal is not None and not self.threaded(portal):
                thread_root = None
            elif thread_root is None:
                known = await self.messages.by_event(room_id, reply_to)
                thread_root = known.thread_root if known else None
            if thread_root:
                content["m.relates_to"] = _thread_relation(thread_root, reply_to)
                content["m.relates_to"]["is_falling_back"] = False
            else:
                content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        await self.sender.send(self.bot, room_id, content)

    async def deliver(self, job: MailJob) -> None:
        """Post a mail into its portal. Raises on failure; the caller retries (idempotently).

        Raises :class:`NoReadableDevice` when the owner has no device that could decrypt it
        yet: the room exists and the invite is out by then, but nothing is posted, since a
        message encrypted to nobody could never be read, not even by their first device.
        """
        if await self._deliver_report(job):
            return
        # Parsing is CPU work that grows with the mail: off the event loop, so one large or
        # nasty mail never stalls SMTP, transactions or anyone else's delivery.
        mail = await asyncio.to_thread(parse_mail, job.raw, collapse_quotes=self.collapse_quotes)
        conv = self._conversation(mail, job)
        portal = await self._portal_for(job, mail, conv)
        author = self._author(mail, job)
        # The ghost's name is set before its room exists, so the invite, the room and the
        # messages show one name, with no "changed their name" line in between.
        intent = await self.ghosts.intent(author.address, author.name)
        room_id = await self.ensure_room(portal)
        if portal.kind == "group":
            # Everyone on the mail is in the conversation, so everyone is in the room (up to
            # MAX_SEATED of them; the text names the rest).
            for person in self._seated(conv, author):
                ghost = await self.ghosts.intent(person.address, person.name)
                await ensure_member(ghost, self.bot, room_id)
        await ensure_member(intent, self.bot, room_id)
        if not await self.sender.can_read(job.owner):
            raise NoReadableDevice(room_id, [job.owner])
        await self.ensure_encrypted(room_id)
        await self._post(job, mail, portal, room_id, intent)

    async def readable(self, user_ids: list[str]) -> set[str]:
        """Which of these users now have a device that can read what the bridge posts."""
        return set(await self.sender.readable([UserID(u) for u in user_ids]))

    @staticmethod
    def _seated(conv: Conversation, author: Address) -> list[Address]:
        others = [p for p in conv.participants if p.address != author.address]
        return others[:MAX_SEATED]

    async def _deliver_report(self, job: MailJob) -> bool:
        """A bounce about mail we sent becomes a notice in its thread, not a mail in the room."""
        report = parse_dsn(job.raw)
        if report is None or not report.original_message_id:
            return False
        room_id = await self.messages.rooms_knowing(job.owner, [report.original_message_id])
        if room_id is None:
            return False
        original = await self.messages.find(room_id, [report.original_message_id])
        assert original is not None
        lines = [describe(r) for r in report.recipients if r.action in ("failed", "delayed")]
        if not lines:
            return True  # a success or relay report: nothing the user needs to see
        await self.notify(RoomID(room_id), "\n".join(lines), original.event_id,
                          original.thread_root)
        return True

    # Choosing the conversation ---------------------------------------------------------------

    def _author(self, mail: ParsedMail, job: MailJob) -> Address:
        for candidate in (mail.from_, mail.sender):
            if candidate and candidate.address and not self.is_local(candidate.address):
                return candidate
        return Address(name="", address=normalize_address(job.envelope_from) or "unknown@invalid")

    def _conversation(self, mail: ParsedMail, job: MailJob) -> Conversation:
        author = self._author(mail, job)
        externals = [a for a in mail.participants() if a.address and not self.is_local(a.address)]
        if not any(a.address == author.address for a in externals):
            externals.insert(0, author)
        if mail.list_id:
            name = mail.list_id.split(".", 1)[0] if "." in mail.list_id else mail.list_id
            return Conversation("list", f"list:{mail.list_id}", name, externals)
        if len(externals) <= 1:
            name = author.name or author.address
            return Conversation("dm", f"dm:{author.address}", name, [author])
        names = [a.name or a.address for a in externals]
        name = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return Conversation("group", group_key(a.address for a in externals), name, externals)

    async def _portal_for(self, job: MailJob, mail: ParsedMail, conv: Conversation) -> PortalRow:
        # A reply stays in the room of the message it answers, even if the Cc list changed —
        # but only when its author is already in that conversation. Message-IDs are not
        # secrets (lists and Cc'd mail spread them), so quoting one must not let a stranger
        # post into someone else's room.
        room_id = await self.messages.rooms_knowing(job.owner, _thread_refs(mail))
        if room_id:
            portal = await self.portals.by_room(room_id)
            if portal and self._takes_part(portal, mail, job):
                return portal
        existing = await self.portals.by_key(job.owner, conv.key)
        if existing:
            return existing
        return await self.portals.get_or_create(
            job.owner, conv.key, conv.kind, conv.name, [a.address for a in conv.participants]
        )

    def _takes_part(self, portal: PortalRow, mail: ParsedMail, job: MailJob) -> bool:
        if portal.kind == "list":
            return portal.conv_key == f"list:{mail.list_id}"
        author = self._author(mail, job).address
        return author in portal.participants

    async def ensure_room(self, portal: PortalRow) -> RoomID:
        if portal.room_id:
            return RoomID(portal.room_id)
        async with self._room_locks.setdefault(portal.id, asyncio.Lock()):
            fresh = await self.portals.by_key(portal.owner, portal.conv_key)
            if fresh and fresh.room_id:
                return RoomID(fresh.room_id)
            room_id = await self._create_room(portal)
        self._room_locks.pop(portal.id, None)
        return room_id

    async def _create_room(self, portal: PortalRow) -> RoomID:
        if portal.kind == "dm":
            creator = await self.ghosts.intent(portal.participants[0])
            topic = f"Email with {portal.participants[0]}"
        else:
            creator = self.bot
            topic = "Email with " + _some(portal.participants)
        room_id = await create_portal_room(
            portal, creator=creator, bot=self.bot, state_store=self.state_store, topic=topic
        )
        await self.portals.set_room(portal.id, room_id)
        portal.room_id = room_id
        return room_id

    # Posting ---------------------------------------------------------------------------------

    def threaded(self, portal: PortalRow) -> bool:
        """Whether this conversation's mail goes into Matrix threads (email.threads; "auto":
        lists and groups are threaded, a one-to-one conversation reads as one timeline)."""
        if self.threads == "auto":
            return portal.kind != "dm"
        return self.threads == "threads"

    async def _post(
        self, job: MailJob, mail: ParsedMail, portal: PortalRow, room_id: RoomID,
        intent: IntentAPI,
    ) -> None:
        known = await self.messages.find(room_id, _thread_refs(mail))
        thread_root = known.thread_root if known else None
        threaded = self.threaded(portal)
        author = self._author(mail, job)
        standing, note = await self._verdict_note(job, room_id, author)
        content = self._text_content(job, mail, root=thread_root is None, verdict_note=note)
        if known and threaded:
            content["m.relates_to"] = _thread_relation(thread_root, known.event_id)
        elif known:
            # replies: every mail in the main timeline, a later one as a reply to the mail it
            # answers, so Element shows the quote and the jump back.
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": known.event_id}}
        first = await self._send_part(job, 0, intent, room_id, content)
        if standing:
            await self._remember_standing(room_id, author.address, standing)
        root = thread_root or first
        if mail.message_id:
            reply_to, cc = self._reply_targets(mail, job)
            await self.messages.put(
                MailMessageRow(
                    room_id, mail.message_id, first, root, mail.subject,
                    reply_to=reply_to, cc=cc, refs=mail.references,
                )
            )
        part = 1
        for attachment in mail.attachments:
            if part not in job.done_parts:
                media = await upload_encrypted(
                    intent,
                    attachment.data,
                    msgtype=attachment.msgtype,
                    filename=attachment.filename,
                    content_type=attachment.content_type,
                    width=attachment.width,
                    height=attachment.height,
                )
                # With their mail, never one level deeper than its text: in its thread when the
                # mail is in one, else in the main timeline right after it.
                if threaded and thread_root:
                    media["m.relates_to"] = _thread_relation(root, first)
                await self._send_part(job, part, intent, room_id, media)
            part += 1
        for problem in mail.problems:
            notice = {"msgtype": "m.notice", "body": f"⚠ {problem}"}
            notice["m.relates_to"] = (
                _thread_relation(root, first)
                if threaded and thread_root
                else {"m.in_reply_to": {"event_id": first}}
            )
            await self._send_part(job, part, intent, room_id, notice)
            part += 1

    def _reply_targets(self, mail: ParsedMail, job: MailJob) -> tuple[list[str], list[str]]:
        """Where an answer to this mail goes: Reply-To (else the author), Cc the others."""
        reply_to = [a.address for a in mail.reply_to if a.address and not self.is_local(a.address)]
        if not reply_to:
            reply_to = [self._author(mail, job).address]
        others = [
            a.address
            for a in mail.participants()
            if a.address and not self.is_local(a.address) and a.address not in reply_to
        ]
        if mail.list_id:
            others = []  # answering a list goes to the list (its Reply-To or author), not to all
        return reply_to, list(dict.fromkeys(others))

    async def _verdict_note(
        self, job: MailJob, room_id: RoomID, author: Address
    ) -> tuple[str | None, str | None]:
        """(standing, the line to show). A failed check is said on every message; mail that
        merely could not be verified gets one quiet note when the conversation starts and again
        only when the sender's standing changes, so the warning that must stop a forger does
        not become noise everyone learns to ignore."""
        warning = job.warning_for(author.address) if job.warning_for else None
        if job.standing_for is None:
            return None, warning  # a verdict from before standings were kept: as it was
        standing = job.standing_for(author.address)
        if standing == "failed":
            return standing, warning
        if standing == "unverified":
            previous = await self.state.get(_standing_key(room_id, author.address))
            if previous != "unverified" and warning:
                return standing, f"{warning} — said once; again only if this changes"
        return standing, None

    async def _remember_standing(self, room_id: RoomID, address: str, standing: str) -> None:
        key = _standing_key(room_id, address)
        if await self.state.get(key) == standing:
            return
        await self.state.set(key, standing)
        portal = await self.portals.by_room(room_id)
        if portal and portal.kind == "dm":
            # The room's topic says the correspondent's current standing.
            topic = f"Email with {address} · {_STANDING_TOPIC[standing]}"
            try:
                await self.bot.send_state_event(room_id, EventType.ROOM_TOPIC, {"topic": topic})
            except Exception:
                self.log.warning("Could not update the topic of %s", room_id, exc_info=True)

    def _text_content(
        self, job: MailJob, mail: ParsedMail, root: bool, verdict_note: str | None = None
    ) -> dict[str, Any]:
        rendered = render_message(mail, root=root)
        notes = []
        author = self._author(mail, job)
        if verdict_note:
            notes.append(verdict_note)
        if job.tag:
            notes.append(f"✉ to {job.recipient}")
        notes += self._recipient_notes(mail, job, author)
        body = rendered.body
        formatted = rendered.formatted_body or html.escape(rendered.body).replace("\n", "<br>")
        if notes:
            body = "\n".join(notes) + "\n\n" + body
            formatted = "".join(f"<p><em>{html.escape(n)}</em></p>" for n in notes) + formatted
        return {"msgtype": "m.text", "body": body, "format": "org.matrix.custom.html",
                "formatted_body": formatted}

    def _recipient_notes(self, mail: ParsedMail, job: MailJob, author: Address) -> list[str]:
        """Say who an answer would reach when that is not simply the people in the room."""
        notes = []
        reply_to, _ = self._reply_targets(mail, job)
        if reply_to != [author.address]:
            notes.append("↩ replies go to " + _some(reply_to))
        unseated = [
            a
            for a in mail.participants()
            if a.address and not self.is_local(a.address) and a.address != author.address
        ][MAX_SEATED:]
        if unseated:
            notes.append(others_line(unseated))
        return notes

    async def _send_part(
        self, job: MailJob, part: int, intent: IntentAPI, room_id: RoomID, content: dict[str, Any]
    ) -> str:
        if part in job.done_parts:
            return job.done_parts[part]
        # Intentional mentions (spec 1.7): an empty set, so "@room" or a name in a mail's text
        # never notifies anyone.
        content["m.mentions"] = {}
        # Derived from the queue entry and part: a retry reuses it, so the homeserver dedups.
        owner_hash = hashlib.sha256(job.owner.encode()).hexdigest()[:8]
        txn_id = f"cloakroom.{job.queue_id}.{owner_hash}.{part}"
        event_id = await self.sender.send(intent, room_id, content, txn_id=txn_id)
        job.done_parts[part] = event_id
        if job.record_part:
            await job.record_part(part, event_id)
        return event_id


def group_key(addresses: Iterable[str]) -> str:
    """The conversation key of a group: its sorted addresses, hashed once that gets long (a
    mail to 2,000 people must not make a 60 KB database key)."""
    joined = ",".join(sorted(set(addresses)))
    if len(joined) > 500:
        joined = "sha256:" + hashlib.sha256(joined.encode()).hexdigest()
    return "group:" + joined


_STANDING_TOPIC = {
    "proven": "sender verified",
    "unverified": "sender not verified (no signature or policy)",
    "failed": "⚠ sender check failed",
}


def _standing_key(room_id: str, address: str) -> str:
    return f"standing:{room_id}:{address}"


def _some(addresses: list[str], shown: int = 10) -> str:
    """``a, b, c and 7 others``: a list that stays readable however long the mail's was."""
    rest = len(addresses) - shown
    return ", ".join(addresses[:shown]) + (f" and {rest} others" if rest > 0 else "")


def _thread_refs(mail: ParsedMail) -> list[str]:
    """Message-IDs to look up, most specific first: the direct parent, then older ancestors."""
    return [*mail.in_reply_to, *reversed(mail.references)]


def _thread_relation(root: str, reply_to: str) -> dict[str, Any]:
    # The spec's thread relation with a reply fallback for clients without thread support.
    return {
        "rel_type": "m.thread",
        "event_id": root,
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": reply_to},
    }
