"""The SMTP/LMTP listener (aiosmtpd hooks). Every answer is an SMTP status, never a traceback.

`250` after DATA means the message and its envelope are committed to the inbound queue; with LMTP
each accepted recipient gets its own status line, as the protocol requires.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from email.message import Message
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import parseaddr
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from .auth import Authenticator, AuthVerdict
from .mailbox import LocalRecipient, RecipientCheck
from .queue import InboundQueue, QueuedRecipient
from .ratelimit import SlidingWindow

TOO_BIG = "552 5.3.4 Message too big for this server"


class _StatusMixin:
    """Give aiosmtpd's built-in size answers their enhanced status codes (RFC 3463)."""

    async def push(self, status: str) -> None:  # type: ignore[override]
        if status.startswith("552 Error"):
            status = TOO_BIG
        await super().push(status)  # type: ignore[misc]


class CloakroomSMTP(_StatusMixin, SMTP):
    pass


class CloakroomLMTP(_StatusMixin, LMTP):
    async def push(self, status: str) -> None:  # type: ignore[override]
        # aiosmtpd refuses oversize or over-long DATA with one reply, but an LMTP client waits
        # for one per accepted recipient (RFC 2033 §4.2) and would time out on the missing ones.
        refused = isinstance(status, str) and status.startswith(_DATA_REFUSALS)
        if refused and self.envelope is not None:
            for _ in range(len(self.envelope.rcpt_tos) - 1):
                await super().push(status)
        await super().push(status)


# What aiosmtpd's smtp_DATA answers, once, after reading data it will not take.
_DATA_REFUSALS = ("552 Error: Too much mail data", "500 Line too long")


class InboundHandler:
    def __init__(
        self,
        *,
        recipients: RecipientCheck,
        queue: InboundQueue,
        authenticator: Authenticator,
        reject_dmarc_failures: bool,
        max_recipients: int,
        per_sender: SlidingWindow,
        per_recipient: SlidingWindow,
        own_domain: str,
        lmtp: bool,
        on_queued: Callable[[], None],
    ) -> None:
        self.recipients = recipients
        self.queue = queue
        self.authenticator = authenticator
        self.reject_dmarc_failures = reject_dmarc_failures
        self.max_recipients = max_recipients
        self.per_sender = per_sender
        self.per_recipient = per_recipient
        self.own_domain = own_domain.lower()
        self.lmtp = lmtp
        self.on_queued = on_queued
        self.log = logging.getLogger("bridge.email.in")

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = _reverse_path(address).lower()
        if sender and not self.per_sender.allowed(sender):
            wait = self.per_sender.retry_after(sender)
            return f"451 4.7.1 Too much mail from {address}; try again in {wait} seconds"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.cloakroom_rcpts = []  # type: ignore[attr-defined]
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        try:
            recipient, status = await self.recipients.check(address)
        except Exception:
            self.log.exception("Recipient check failed for %s", address)
            return "451 4.3.0 Temporary failure; try again later"
        if recipient is None:
            self.log.info("Refused RCPT %s from %s: %s", address, envelope.mail_from, status)
            return status
        if not self.per_recipient.allowed(recipient.user_id):
            wait = self.per_recipient.retry_after(recipient.user_id)
            return f"451 4.7.1 Too much mail for this mailbox; try again in {wait} seconds"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        envelope.cloakroom_rcpts.append(recipient)  # type: ignore[attr-defined]
        return status

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        recipients: list[LocalRecipient] = getattr(envelope, "cloakroom_rcpts", [])
        try:
            status = await self._handle_DATA(session, envelope, recipients)
        except Exception:
            self.log.exception("Failed to accept a message from %s", envelope.mail_from)
            status = "451 4.3.0 Temporary failure; the message was not accepted, try again later"
        # LMTP answers once per accepted recipient; SMTP once.
        count = len(envelope.rcpt_tos) if self.lmtp else 1
        return "\r\n".join([status] * max(count, 1))

    async def _handle_DATA(
        self, session: Session, envelope: Envelope, recipients: list[LocalRecipient]
    ) -> str:
        raw: bytes = envelope.original_content or b""
        headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
        if self._is_our_own(headers.get("Message-ID", "")):
            self.log.warning(
                "Dropped a message from %s carrying our own Message-ID %s (mail loop)",
                envelope.mail_from,
                headers.get("Message-ID"),
            )
            return "250 2.0.0 Dropped: this message came from this server (loop)"
        peer_ip = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        verdict = await self.authenticator.check(
            raw, mail_from=envelope.mail_from or "", peer_ip=peer_ip, helo=session.host_name or ""
        )
        if verdict.should_reject and self.reject_dmarc_failures:
            self.log.info("Refused mail from %s: DMARC failure, p=reject", verdict.from_domain)
            return (
                f"550 5.7.1 Rejected: {verdict.from_domain} asks to refuse mail that fails "
                "DMARC authentication, and this one does"
            )
        queue_id = await self._enqueue(raw, session, envelope, recipients, verdict, headers)
        self.log.info("Queued %s from %s for %d recipient(s)", queue_id, envelope.mail_from,
                      len(recipients))
        return f"250 2.0.0 Queued as {queue_id}"

    def _is_our_own(self, message_id: str) -> bool:
        domain = message_id.strip().strip("<>").rpartition("@")[2].lower()
        return bool(domain) and domain == self.own_domain

    async def _enqueue(
        self,
        raw: bytes,
        session: Session,
        envelope: Envelope,
        recipients: list[LocalRecipient],
        verdict: AuthVerdict,
        headers: Message,
    ) -> str:
        peer = session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)
        mail_from = _reverse_path(envelope.mail_from)
        queue_id = await self.queue.enqueue(
            raw=raw,
            mail_from=mail_from,
            peer=peer,
            helo=session.host_name or "",
            auth=verdict.to_json(),
            recipients=[QueuedRecipient(r.user_id, r.recipient, r.tag) for r in recipients],
            order_key=_order_key(headers, mail_from),
        )
        # Counted once committed: refused or failed attempts don't use up the sender's quota.
        if mail_from:
            self.per_sender.hit(mail_from.lower())
        for user_id in {r.user_id for r in recipients}:
            self.per_recipient.hit(user_id)
        self.on_queued()
        return queue_id


def _reverse_path(address: str | None) -> str:
    """The envelope sender, "" for the null sender: aiosmtpd keeps `MAIL FROM:<>` as "<>"."""
    return "" if not address or address == "<>" else address


def _order_key(headers: Message, mail_from: str) -> str:
    """Which conversation a mail belongs to, as far as delivery order goes: its list, else its
    author. Deliberately coarse: it only decides what may be delivered in parallel."""
    list_id = str(headers.get("List-Id", "") or "").strip().lower()
    if list_id:
        return f"list:{list_id}"
    author = parseaddr(str(headers.get("From", "") or ""))[1].lower()
    return f"from:{author or mail_from.lower()}"


async def start_listener(
    handler: InboundHandler,
    *,
    host: str,
    port: int,
    lmtp: bool,
    max_size: int,
    hostname: str,
    tls_cert: str = "",
    tls_key: str = "",
) -> asyncio.AbstractServer:
    tls_context: ssl.SSLContext | None = None
    if tls_cert:
        tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls_context.load_cert_chain(tls_cert, tls_key)
    protocol = CloakroomLMTP if lmtp else CloakroomSMTP
    kwargs: dict[str, Any] = {
        "data_size_limit": max_size,
        "enable_SMTPUTF8": True,
        "decode_data": False,
        "hostname": hostname,
        "ident": "Cloakroom",
    }
    if tls_context:
        kwargs["tls_context"] = tls_context
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: protocol(handler, **kwargs), host=host, port=port)
