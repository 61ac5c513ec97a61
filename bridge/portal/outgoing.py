"""Matrix → email in the hub: a message the mailbox owner writes in a portal becomes a mail.

The hub only composes and queues (the outbox table); the outbound worker on the email edge sends.
Everything that is not mailed is explained to the user with a notice, never silently dropped.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.crypto.attachments import decrypt_attachment
from mautrix.types import MessageEvent, RedactionEvent, RelationType, RoomID, UserID

from ..db import BridgeState
from ..formatter import OutgoingAttachment, OutgoingMail, compose, new_message_id, reply_subject
from ..identifiers import is_local_address, local_mailbox_address, mailbox_refusal
from ..worker import now_ms
from .outbox import Outbox, SentRecently
from .store import MailMessageRow, MessageMap, PortalRow

MEDIA_TYPES = ("m.image", "m.file", "m.video", "m.audio")


@dataclass
class OutgoingSettings:
    email_domain: str
    relay_configured: bool
    rate_limit: int  # recipients (not mails) per rate window
    rate_window_ms: int
    edits: str  # "notice" | "correction"
    may_send: Callable[[str], bool] = lambda _user: True  # the permissions check
    max_recipients: int = 50  # per mail: email.outbound.max_recipients


@dataclass
class Route:
    """Where a message goes: its Matrix thread, the mail it answers, and who receives it."""

    thread_root: str | None
    answered: MailMessageRow | None
    to: list[str]
    cc: list[str]

    @property
    def recipients(self) -> list[str]:
        return [*self.to, *self.cc]


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
        refusal = self._refusal(evt)
        if refusal:
            await self.notify(evt.room_id, refusal, evt.event_id)
            return
        address = self._address_of(portal.owner)
        if address is None:
            reason = mailbox_refusal(portal.owner, self._homeserver_domain)
            await self.notify(
                evt.room_id,
                f"Not emailed: you have no email address on this bridge ({reason}), and mail "
                "from you must not arrive as somebody else's.",
                evt.event_id,
            )
            return
        route = await self._route(portal, evt)
        if not await self._may_mail(portal, evt, route):
            return
        await self._queue(portal, evt, route, address)

    def _refusal(self, evt: MessageEvent) -> str | None:
        """Why this message cannot be mailed at all, before looking at where it would go."""
        if not self.settings.may_send(evt.sender):
            return "Not emailed: you are no longer allowed to send mail through this bridge."
        if _is_edit(evt) and self.settings.edits != "correction":
            return "Email can't be edited: the recipients keep the version already sent."
        if not self.settings.relay_configured:
            return (
                "Sending mail is not set up on this server (email.relay.host is empty), so this "
                "message was not emailed."
            )
        return None

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

    # Who receives it, and how many ------------------------------------------------------------

    async def _may_mail(self, portal: PortalRow, evt: MessageEvent, route: Route) -> bool:
        count = len(route.recipients)
        text = None
        if count == 0:
            text = "Not emailed: nobody in this conversation has an address outside this server."
        elif count > self.settings.max_recipients:
            # Reply-To and Cc come from the mail answered: a sender could name hundreds of
            # people nobody in the room sees. Over the cap, nothing leaves.
            text = (
                f"Not emailed: this would go to {count} addresses ({_listing(route.recipients)}), "
                f"more than the {self.settings.max_recipients} one mail may have. To write to "
                "some of them, start a new conversation with `new` in your chat with the bot."
            )
        if text:
            await self.notify(evt.room_id, text, evt.event_id)
            return False
        return await self._within_rate(portal, evt, count)

    async def _within_rate(self, portal: PortalRow, evt: MessageEvent, count: int) -> bool:
        """The rate limit counts recipients: one mail to 50 people weighs as 50 mails."""
        limit, window = self.settings.rate_limit, self.settings.rate_window_ms
        if count > limit:
            await self.notify(
                evt.room_id,
                f"Not emailed: this would go to {count} addresses, and you may send to at most "
                f"{limit} per {_duration(window)}.",
                evt.event_id,
            )
            return False
        sent = await self.outbox.sent_since(portal.owner, now_ms() - window)
        used = sum(s.recipients for s in sent)
        if used + count <= limit:
            return True
        resume_ms = _resumes_at(sent, used, count, limit) + window
        resumes = dt.datetime.fromtimestamp(resume_ms / 1000, dt.UTC)
        minutes = max(1, int((resume_ms - now_ms()) / 60000 + 0.999))
        adding = f" (this one would add {count})" if count > 1 else ""
        await self.notify(
            evt.room_id,
            f"Not emailed: you have sent mail to {used} recipients recently{adding}, the limit "
            f"is {limit} per {_duration(window)}. Sending resumes at {resumes:%H:%M} UTC (in "
            f"about {minutes} min).",
            evt.event_id,
        )
        return False

    async def _tell_recipients_once(
        self, portal: PortalRow, evt: MessageEvent, route: Route
    ) -> None:
        """When a mail goes to other people than the conversation's (a Reply-To or Cc of the
        mail answered, or fewer people), say exactly to whom. Once per set of recipients in a
        room: a notice on every message would soon go unread."""
        visible = self._external(portal.participants)
        seen, chosen = {a.lower() for a in visible}, {a.lower() for a in route.recipients}
        if seen == chosen:
            return
        digest = hashlib.sha256(" ".join(sorted(chosen)).encode()).hexdigest()[:32]
        key = f"notice:recipients:{evt.room_id}:{digest}"
        if await self.state.get(key):
            return
        text = f"✉ This goes to: {', '.join(route.recipients)}."
        extra = [a for a in route.recipients if a.lower() not in seen]
        if extra:
            text += (
                f" Not in this room: {', '.join(extra)} (from the Reply-To or Cc of the mail "
                "you are answering)."
            )
        missing = [a for a in visible if a.lower() not in chosen]
        if missing:
            text += f" Not to: {', '.join(missing)}."
        try:
            await self.notify(evt.room_id, text, evt.event_id)
        except Exception:  # the mail is queued: a lost notice must not say it was not sent
            self.log.getChild(evt.room_id).warning("Could not post the recipients notice")
            return
        await self.state.set(key, "1")

    # Queueing ---------------------------------------------------------------------------------

    async def _queue(
        self, portal: PortalRow, evt: MessageEvent, route: Route, address: str
    ) -> None:
        answered = route.answered
        message_id = new_message_id(self.settings.email_domain)
        subject = self._subject(portal, answered, evt)
        mail = OutgoingMail(
            from_name=await self._display_name(evt.sender),
            from_address=address,
            to=[("", a) for a in route.to],
            cc=[("", a) for a in route.cc],
            subject=subject,
            message_id=message_id,
            in_reply_to=answered.message_id if answered else None,
            references=[*answered.refs, answered.message_id] if answered else [],
            body=_body(evt),
            formatted_body=self._formatted(evt),
            attachments=await self._attachments(evt),
        )
        raw = compose(mail)
        root = route.thread_root or evt.event_id
        queued = await self.outbox.add(
            event_id=evt.event_id,
            room_id=evt.room_id,
            owner=portal.owner,
            thread_root=root,
            message_id=message_id,
            mail_from=mail.from_address,
            recipients=route.recipients,
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
                reply_to=route.to,
                cc=route.cc,
                refs=mail.references,
            )
        )
        self.log.getChild(evt.room_id).info("Queued %s as <%s>", evt.event_id, message_id)
        # Before waking the worker, so the notice normally comes before the mail leaves.
        await self._tell_recipients_once(portal, evt, route)
        self.on_queued()

    # Composition details ---------------------------------------------------------------------

    @property
    def _homeserver_domain(self) -> str:
        # The bot is a local user by definition: its server is the homeserver's.
        return str(self.bot.mxid).split(":", 1)[1]

    def _address_of(self, user_id: str) -> str | None:
        return local_mailbox_address(user_id, self._homeserver_domain, self.settings.email_domain)


    def _external(self, addresses: list[str]) -> list[str]:
        """Addresses outside this server, each once (compared without case), in order."""
        kept: dict[str, str] = {}
        for address in addresses:
            if address and not is_local_address(address, self.settings.email_domain):
                kept.setdefault(address.lower(), address)
        return list(kept.values())

    async def _route(self, portal: PortalRow, evt: MessageEvent) -> Route:
        thread_root, answered = await self._context(evt)
        to, cc = self._recipients(portal, answered)
        return Route(thread_root, answered, to, cc)

    async def _context(self, evt: MessageEvent) -> tuple[str | None, MailMessageRow | None]:
        """The Matrix thread this message is in, and the mail it answers."""
        relates = evt.content.relates_to
        reply_to = relates.in_reply_to.event_id if relates and relates.in_reply_to else None
        if relates and relates.rel_type == RelationType.THREAD:
            root = relates.event_id
            if reply_to and not relates.is_falling_back:
                answered = await self.messages.by_event(evt.room_id, reply_to)
                if answered:
                    return root, answered
            return root, await self.messages.latest_in_thread(evt.room_id, root)
        if relates and relates.rel_type == RelationType.REPLACE:
            # A correction answers the mail of the message it corrects.
            original = await self.messages.by_event(evt.room_id, relates.event_id)
            if original:
                return original.thread_root, original
        elif reply_to:
            answered = await self.messages.by_event(evt.room_id, reply_to)
            if answered:
                return answered.thread_root, answered
        # Typed in the main timeline (or a reply to something never mailed, like a notice): it
        # continues the conversation, answering its latest mail in either direction, so it
        # threads in the correspondent's mail client. Their answer then threads at this message.
        return None, await self.messages.latest_in_room(evt.room_id)

    def _recipients(
        self, portal: PortalRow, answered: MailMessageRow | None
    ) -> tuple[list[str], list[str]]:
        if answered and answered.reply_to:
            to = self._external(answered.reply_to)
            taken = {a.lower() for a in to}
            cc = [a for a in self._external(answered.cc) if a.lower() not in taken]
            if to:
                return to, cc
        participants = self._external(portal.participants)
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

    async def _display_name(self, user_id: str) -> str:
        """The sender's display name from their global profile (not a per-room nickname).
        Looked up for every mail, a few a minute at most: nothing to go stale on a rename."""
        try:
            name = await self.bot.get_displayname(UserID(user_id))
        except Exception:
            self.log.debug("No display name for %s", user_id, exc_info=True)
            name = None
        if isinstance(name, str) and name.strip():
            return name
        return user_id[1:].split(":", 1)[0]

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


def _listing(addresses: list[str], shown: int = 5) -> str:
    if len(addresses) <= shown:
        return ", ".join(addresses)
    return ", ".join(addresses[:shown]) + f" and {len(addresses) - shown} more"


def _duration(ms: int) -> str:
    if ms % 3_600_000 == 0:
        hours = ms // 3_600_000
        return "hour" if hours == 1 else f"{hours} hours"
    if ms % 60_000 == 0:
        return f"{ms // 60_000} min"
    return f"{max(1, round(ms / 1000))} s"


def _resumes_at(sent: list[SentRecently], used: int, count: int, limit: int) -> int:
    """When the oldest of `sent` to leave the window make room for `count` more recipients:
    the creation time of the last one that has to go (add the window for the moment)."""
    freed = 0
    for mail in sent:
        freed += mail.recipients
        if used - freed + count <= limit:
            return mail.created_at
    return sent[-1].created_at if sent else now_ms()
