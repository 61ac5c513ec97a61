"""Matrix → email in the hub: a message the mailbox owner writes in a portal becomes a mail.

The hub only composes and queues (the outbox table); the outbound worker on the email edge sends.
Everything that is not mailed is explained to the user with a notice, never silently dropped.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.crypto.attachments import decrypt_attachment
from mautrix.types import MessageEvent, RedactionEvent, RelationType, RoomID

from ..db import BridgeState
from ..formatter import OutgoingAttachment, OutgoingMail, compose, new_message_id, reply_subject
from ..worker import now_ms
from .outbox import Outbox
from .store import MailMessageRow, MessageMap, PortalRow

MEDIA_TYPES = ("m.image", "m.file", "m.video", "m.audio")


@dataclass
class OutgoingSettings:
    email_domain: str
    relay_configured: bool
    rate_limit: int
    rate_window_ms: int
    edits: str  # "notice" | "correction"
    may_send: Callable[[str], bool] = lambda _user: True  # the permissions check


Notify = Callable[[RoomID, str, str | None], Awaitable[None]]


class Outgoing:
    def __init__(
        self,
        *,
        bot: IntentAPI,
        outbox: Outbox,
        messages: MessageMap,
        state: BridgeState,
        settings: OutgoingSettings,
        notify: Notify,
        on_queued: Callable[[], None],
    ) -> None:
        self.bot = bot
        self.outbox = outbox
        self.messages = messages
        self.state = state
        self.settings = settings
        self.notify = notify  # (room, text, event to reply to) → a notice in the room
        self.on_queued = on_queued
        self.log = logging.getLogger("bridge.portal.out")

    async def handle_message(self, portal: PortalRow, evt: MessageEvent) -> None:
        try:
            await self._handle_message(portal, evt)
        except Exception:
            self.log.getChild(evt.room_id).exception("Failed to mail %s", evt.event_id)
            await self.notify(
                evt.room_id, "⚠ Something went wrong; this message was not emailed.", evt.event_id
            )

    async def _handle_message(self, portal: PortalRow, evt: MessageEvent) -> None:
        if evt.sender != portal.owner:
            await self._tell_not_owner_once(portal, evt)
            return
        if not self.settings.may_send(evt.sender):
            await self.notify(
                evt.room_id,
                "Not emailed: you are no longer allowed to send mail through this bridge.",
                evt.event_id,
            )
            return
        relates = evt.content.relates_to
        if relates and relates.rel_type == RelationType.REPLACE:
            if self.settings.edits != "correction":
                await self.notify(
                    evt.room_id,
                    "Email can't be edited: the recipients keep the version already sent.",
                    evt.event_id,
                )
                return
        if not self.settings.relay_configured:
            await self.notify(
                evt.room_id,
                "Sending mail is not set up on this server (email.relay.host is empty), so this "
                "message was not emailed.",
                evt.event_id,
            )
            return
        if not await self._within_rate(portal, evt):
            return
        await self._queue(portal, evt)

    async def _tell_not_owner_once(self, portal: PortalRow, evt: MessageEvent) -> None:
        key = f"notice:not-owner:{evt.room_id}:{evt.sender}"
        if await self.state.get(key):
            return
        await self.state.set(key, "1")
        await self.notify(
            evt.room_id,
            f"Only {portal.owner} sends mail from this conversation: messages from other "
            "people here stay in Matrix and are not emailed.",
            evt.event_id,
        )

    async def _within_rate(self, portal: PortalRow, evt: MessageEvent) -> bool:
        window = self.settings.rate_window_ms
        sent = await self.outbox.sent_since(portal.owner, now_ms() - window)
        if len(sent) < self.settings.rate_limit:
            return True
        resumes = dt.datetime.fromtimestamp((sent[0] + window) / 1000, dt.UTC)
        minutes = max(1, int((sent[0] + window - now_ms()) / 60000 + 0.999))
        await self.notify(
            evt.room_id,
            f"Not emailed: you have sent {len(sent)} mails recently, the limit is "
            f"{self.settings.rate_limit}. Sending resumes at {resumes:%H:%M} UTC "
            f"(in about {minutes} min).",
            evt.event_id,
        )
        return False

    async def _queue(self, portal: PortalRow, evt: MessageEvent) -> None:
        thread_root, answered = await self._context(evt)
        to, cc = self._recipients(portal, answered)
        message_id = new_message_id(self.settings.email_domain)
        subject = self._subject(portal, answered, evt)
        mail = OutgoingMail(
            from_name=await self._display_name(evt),
            from_address=self._address_of(portal.owner),
            to=[("", a) for a in to],
            cc=[("", a) for a in cc],
            subject=subject,
            message_id=message_id,
            in_reply_to=answered.message_id if answered else None,
            references=[*answered.refs, answered.message_id] if answered else [],
            body=_body(evt),
            formatted_body=self._formatted(evt),
            attachments=await self._attachments(evt),
        )
        raw = compose(mail)
        root = thread_root or evt.event_id
        queued = await self.outbox.add(
            event_id=evt.event_id,
            room_id=evt.room_id,
            owner=portal.owner,
            thread_root=root,
            message_id=message_id,
            mail_from=mail.from_address,
            recipients=[*to, *cc],
            raw=raw,
        )
        if not queued:
            return  # the same event again (a replayed transaction): already in the outbox
        # Replies to this mail come back into this thread (or start one at this message).
        await self.messages.put(
            MailMessageRow(
                room_id=evt.room_id,
                message_id=message_id,
                event_id=evt.event_id,
                thread_root=root,
                subject=subject,
                reply_to=to,
                cc=cc,
                refs=mail.references,
            )
        )
        self.log.getChild(evt.room_id).info("Queued %s as <%s>", evt.event_id, message_id)
        self.on_queued()

    # Composition details ---------------------------------------------------------------------

    def _address_of(self, user_id: str) -> str:
        return f"{user_id[1:].split(':', 1)[0]}@{self.settings.email_domain}"

    async def _context(self, evt: MessageEvent) -> tuple[str | None, MailMessageRow | None]:
        """The Matrix thread this message is in, and the mail it answers."""
        relates = evt.content.relates_to
        if not relates:
            return None, None
        reply_to = relates.in_reply_to.event_id if relates.in_reply_to else None
        if relates.rel_type == RelationType.THREAD:
            root = relates.event_id
            if reply_to and not relates.is_falling_back:
                answered = await self.messages.by_event(evt.room_id, reply_to)
                if answered:
                    return root, answered
            return root, await self.messages.latest_in_thread(evt.room_id, root)
        if reply_to:
            answered = await self.messages.by_event(evt.room_id, reply_to)
            return (answered.thread_root if answered else None), answered
        return None, None

    def _recipients(
        self, portal: PortalRow, answered: MailMessageRow | None
    ) -> tuple[list[str], list[str]]:
        ours = f"@{self.settings.email_domain}"
        if answered and answered.reply_to:
            to = [a for a in answered.reply_to if not a.endswith(ours)]
            cc = [a for a in answered.cc if a not in to and not a.endswith(ours)]
            if to:
                return to, cc
        participants = [a for a in portal.participants if not a.endswith(ours)]
        return participants[:1], participants[1:]

    def _subject(
        self, portal: PortalRow, answered: MailMessageRow | None, evt: MessageEvent
    ) -> str:
        if answered and answered.subject:
            subject = reply_subject(answered.subject)
        else:
            subject = portal.subject or f"Message from {evt.sender[1:].split(':', 1)[0]}"
        if _is_edit(evt):
            return f"Correction: {subject}"
        return subject

    async def _display_name(self, evt: MessageEvent) -> str:
        try:
            member = await self.bot.get_room_member_info(evt.room_id, evt.sender)
            if member and member.displayname:
                return member.displayname
        except Exception:
            self.log.debug("No display name for %s", evt.sender, exc_info=True)
        return evt.sender[1:].split(":", 1)[0]

    @staticmethod
    def _formatted(evt: MessageEvent) -> str | None:
        # For an edit, the new text is in m.new_content; `body` holds a "* …" fallback.
        content: Any = evt.content
        new = getattr(content, "new_content", None)
        source = new if new is not None else content
        if getattr(source, "format", None) and getattr(source, "formatted_body", None):
            return str(source.formatted_body)
        return None

    async def _attachments(self, evt: MessageEvent) -> list[OutgoingAttachment]:
        content: Any = evt.content
        if str(content.msgtype) not in MEDIA_TYPES:
            return []
        info = content.info
        mimetype = (getattr(info, "mimetype", None) or "application/octet-stream").lower()
        filename = getattr(content, "filename", None) or content.body or "attachment"
        if content.file and content.file.url:
            ciphertext = await self.bot.download_media(content.file.url)
            data = decrypt_attachment(
                ciphertext, content.file.key.key, content.file.hashes["sha256"], content.file.iv
            )
        elif content.url:
            data = await self.bot.download_media(content.url)
        else:
            return []
        return [OutgoingAttachment(filename=filename, content_type=mimetype, data=data)]

    # Redactions ------------------------------------------------------------------------------

    async def handle_redaction(self, portal: PortalRow, evt: RedactionEvent) -> None:
        if evt.sender != portal.owner or not evt.redacts:
            return
        status = await self.outbox.get(evt.redacts)
        if status is None:
            return
        if status[0] == "pending" and await self.outbox.cancel(evt.redacts):
            text = "Not emailed: you deleted the message before it was sent."
        else:
            text = "Email can't be unsent: the recipients already have the deleted message."
        await self.notify(evt.room_id, text, None)


def _is_edit(evt: MessageEvent) -> bool:
    relates = evt.content.relates_to
    return bool(relates and relates.rel_type == RelationType.REPLACE)


def _body(evt: MessageEvent) -> str:
    new = getattr(evt.content, "new_content", None) if _is_edit(evt) else None
    return str((new.body if new is not None else evt.content.body) or "")
