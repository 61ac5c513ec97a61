"""The SMTP/LMTP listener (aiosmtpd hooks). Every answer is an SMTP status, never a traceback.

`250` after DATA means the message and its envelope are committed to the inbound queue; with LMTP
each accepted recipient gets its own status line, as the protocol requires. What the listener
will not take it refuses with a status, at the earliest command that can tell: nothing is
accepted and then dropped.

Sessions are counted (:class:`Sessions`): over ``max_connections`` at once, or over the per-IP
connection rate, a new connection is greeted with ``421 4.7.0`` and closed. On stop, the
listener drains: new connections and idle sessions get ``421 4.3.2 Service shutting down``
(RFC 5321 §3.8), a command in progress (a DATA being received and committed) is finished and
answered first, and sessions still open after the drain deadline are closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from email.utils import parseaddr
from typing import Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Envelope, Session

from ..metrics import MAIL_ACCEPTED, count_refusal, smtp_replies
from .auth import Authenticator, AuthVerdict, HeaderSection, read_header_section
from .auth.headers import DEFAULT_MAX_HEADER_SIZE
from .mailbox import LocalRecipient, RecipientCheck
from .queue import InboundQueue, QueuedRecipient
from .ratelimit import SlidingWindow

TOO_BIG = "552 5.3.4 Message too big for this server"
SHUTTING_DOWN = "421 4.3.2 Service shutting down"
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections; try again later"
CONNECTING_TOO_OFTEN = "421 4.7.0 Too many connections from your address; try again later"
LOOP = "554 5.4.6 Routing loop detected: this message was sent by this server"
MAILBOX_FULL = "452 4.2.2 Mailbox full; try again later"
TOO_MANY_ERRORS = "421 4.7.0 Too many refused recipients; closing the connection"
DRAIN_SECONDS = 10.0
# Refused RCPTs one session may collect before it is closed (Postfix: smtpd_hard_error_limit).
# Every RCPT may ask the homeserver whether a user exists: a dictionary attack on one connection
# is bounded by this, and across connections by the per-IP connection rate.
HARD_ERROR_LIMIT = 20

log = logging.getLogger("bridge.email.in")
# aiosmtpd logs every command at INFO and every DATA line at DEBUG under "mail.log": mail content
# and addresses must never reach the logs, whatever level the rest of the bridge logs at.
AIOSMTPD_LOGGER = "mail.log"

IsOwnMessageId = Callable[[str], Awaitable[bool]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


def quiet_aiosmtpd_log() -> None:
    """Pin aiosmtpd's logger to WARNING. The filter survives a later logging.config.dictConfig,
    which resets the level of loggers below the ones it configures (and may name this one)."""
    logger = logging.getLogger(AIOSMTPD_LOGGER)
    logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _BelowWarning) for f in logger.filters):
        logger.addFilter(_BelowWarning())


quiet_aiosmtpd_log()


class Sessions:
    """The open SMTP sessions: admission (how many, how often per address) and the drain."""

    def __init__(
        self,
        *,
        max_connections: int = 100,
        per_ip: SlidingWindow | None = None,
        exempt: Iterable[str] = (),
    ) -> None:
        self.max_connections = max_connections
        self.per_ip = per_ip  # connections per peer address; None: no limit
        self.exempt: list[Network] = [ipaddress.ip_network(n, strict=False) for n in exempt]
        self.open: set[_SessionMixin] = set()
        self.draining = False
        self._empty = asyncio.Event()
        self._empty.set()

    def is_exempt(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
        return any(address in network for network in self.exempt)

    def admit(self, protocol: _SessionMixin, ip: str) -> str | None:
        """None, and the session is counted; or the status to greet it with before closing."""
        if self.draining:
            return SHUTTING_DOWN
        if len(self.open) >= self.max_connections:
            log.warning("Refused a connection from %s: %d sessions open", ip, len(self.open))
            return TOO_MANY_CONNECTIONS
        if self.per_ip is not None and not self.is_exempt(ip):
            if not self.per_ip.allowed(ip):
                log.info("Refused a connection from %s: connecting too often", ip)
                return CONNECTING_TOO_OFTEN
            self.per_ip.hit(ip)
        self.open.add(protocol)
        self._empty.clear()
        return None

    def release(self, protocol: _SessionMixin) -> None:
        self.open.discard(protocol)
        if not self.open:
            self._empty.set()

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Say 421 to every session as soon as it is between commands; wait ≤ ``timeout``."""
        self.draining = True
        for protocol in list(self.open):
            if not protocol.busy:
                protocol.goodbye()
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            log.warning("Closing %d SMTP session(s) still busy after %.0f s", len(self.open),
                        timeout)
            for protocol in list(self.open):
                protocol.goodbye(SHUTTING_DOWN)
                self.release(protocol)


class _SessionMixin:
    """Admission, the 421 on shutdown, and enhanced status codes for aiosmtpd's size answers."""

    def __init__(self, *args: Any, sessions: Sessions, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sessions = sessions
        self.busy = False
        methods: dict[str, Any] = self._smtp_methods  # type: ignore[has-type]
        self._smtp_methods = {name: self._guarded(m) for name, m in methods.items()}

    def _guarded(self, method: Callable[[str | None], Awaitable[None]]) -> Any:
        async def command(arg: str | None) -> None:
            if self.sessions.draining and method.__name__ != "smtp_QUIT":
                self.goodbye()
                return
            self.busy = True
            try:
                await method(arg)
            finally:
                self.busy = False
            # The command in progress when the drain began is finished and answered; now 421.
            if self.sessions.draining:
                self.goodbye()
            elif getattr(self.session, "cloakroom_close", False):  # type: ignore[attr-defined]
                transport = getattr(self, "transport", None)
                if transport is not None:
                    transport.close()  # after the 421 that said why

        for attribute in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if hasattr(method, attribute):  # HELP reads them
                setattr(command, attribute, getattr(method, attribute))
        return command

    def goodbye(self, status: str = SHUTTING_DOWN) -> None:
        """Send ``status`` and close; the transport flushes it first. RFC 5321 §3.8 allows the
        421 between commands: the client reads it as the answer to its next one."""
        transport = getattr(self, "transport", None)
        if transport is None or transport.is_closing():
            return
        self._writer.write(status.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()

    async def _handle_client(self) -> None:
        peer = self.session.peer  # type: ignore[attr-defined]
        ip = peer[0] if isinstance(peer, tuple) else str(peer)
        refusal = self.sessions.admit(self, ip)
        if refusal is not None:
            count_refusal("connect", refusal)
            self.goodbye(refusal)
            return
        await super()._handle_client()  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        self.sessions.release(self)
        super().connection_lost(error)  # type: ignore[misc]

    async def push(self, status: str) -> None:  # type: ignore[override]
        if status.startswith("552 Error"):
            status = TOO_BIG
            count_refusal("data", status)  # aiosmtpd's own refusal: our DATA hook never runs
        await super().push(status)  # type: ignore[misc]


class CloakroomSMTP(_SessionMixin, SMTP):
    pass


class CloakroomLMTP(_SessionMixin, LMTP):
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
        is_own_message_id: IsOwnMessageId,
        lmtp: bool,
        on_queued: Callable[[], None],
        per_null_sender_ip: SlidingWindow | None = None,
        max_header_size: int = DEFAULT_MAX_HEADER_SIZE,
        hold_max_messages: int | None = None,
        hold_max_bytes: int | None = None,
        sessions: Sessions | None = None,
    ) -> None:
        self.recipients = recipients
        self.queue = queue
        self.authenticator = authenticator
        self.reject_dmarc_failures = reject_dmarc_failures
        self.max_recipients = max_recipients
        self.per_sender = per_sender
        self.per_recipient = per_recipient
        # The null sender is every bounce on the internet, not one sender: it is counted per
        # peer address instead (exempt networks, e.g. a local MTA, are not counted).
        self.per_null_sender_ip = per_null_sender_ip
        self.is_own_message_id = is_own_message_id
        self.max_header_size = max_header_size
        self.hold_max_messages = hold_max_messages
        self.hold_max_bytes = hold_max_bytes
        self.sessions = sessions or Sessions()
        self.lmtp = lmtp
        self.on_queued = on_queued
        self.log = log

    @smtp_replies("mail")
    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = _reverse_path(address).lower()
        if sender and not self.per_sender.allowed(sender):
            wait = self.per_sender.retry_after(sender)
            return f"451 4.7.1 Too much mail from {address}; try again in {wait} seconds"
        null_key = self._null_sender_key(sender, session)
        if null_key and not self.per_null_sender_ip.allowed(null_key):  # type: ignore[union-attr]
            wait = self.per_null_sender_ip.retry_after(null_key)  # type: ignore[union-attr]
            return (
                f"451 4.7.1 Too many bounces (MAIL FROM:<>) from your address; try again in "
                f"{wait} seconds"
            )
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.cloakroom_rcpts = []  # type: ignore[attr-defined]
        return "250 2.1.0 Sender OK"

    def _null_sender_key(self, sender: str, session: Session) -> str | None:
        if sender or self.per_null_sender_ip is None:
            return None
        ip = _peer_ip(session)
        return None if self.sessions.is_exempt(ip) else ip

    @smtp_replies("rcpt")
    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return "452 4.5.3 Too many recipients"
        try:
            recipient, status = await self.recipients.check(address)
            if recipient is not None and await self.mailbox_full(recipient.user_id):
                recipient, status = None, MAILBOX_FULL
        except Exception:
            self.log.exception("Recipient check failed for %s", address)
            return "451 4.3.0 Temporary failure; try again later"
        if recipient is None:
            self.log.info("Refused RCPT %s from %s: %s", address, envelope.mail_from, status)
            return self._refused(session, status)
        if not self.per_recipient.allowed(recipient.user_id):
            wait = self.per_recipient.retry_after(recipient.user_id)
            return f"451 4.7.1 Too much mail for this mailbox; try again in {wait} seconds"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        envelope.cloakroom_rcpts.append(recipient)  # type: ignore[attr-defined]
        return status

    def _refused(self, session: Session, status: str) -> str:
        errors = getattr(session, "cloakroom_errors", 0) + 1
        session.cloakroom_errors = errors  # type: ignore[attr-defined]
        if errors < HARD_ERROR_LIMIT:
            return status
        self.log.info("Closing a session from %s: %d refused recipients", _peer_ip(session),
                      errors)
        session.cloakroom_close = True  # type: ignore[attr-defined]
        return TOO_MANY_ERRORS

    async def mailbox_full(self, user_id: str) -> bool:
        """Whether the mail waiting for this user (held until their first device) is at quota."""
        held_usage = getattr(self.queue, "held_usage", None)
        if held_usage is None:  # an InboundQueue from before holding existed
            return False
        count, size = await held_usage(user_id)
        full = (self.hold_max_messages is not None and count >= self.hold_max_messages) or (
            self.hold_max_bytes is not None and size >= self.hold_max_bytes
        )
        if full:
            self.log.info("Mailbox of %s is full: %d messages, %d bytes held", user_id, count,
                          size)
        return full

    @smtp_replies("data")
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
        # The one reading of the headers: the sender check and the queue key use it, and it only
        # accepts what the reader's parser must read the same way.
        headers = read_header_section(raw, max_size=self.max_header_size)
        if isinstance(headers, str):
            self.log.info("Refused a message from %s: %s", envelope.mail_from, headers)
            return headers
        if await self._is_loop(headers, envelope):
            return LOOP
        verdict = await self.authenticator.check(
            raw,
            mail_from=envelope.mail_from or "",
            peer_ip=_peer_ip(session),
            helo=session.host_name or "",
            headers=headers,
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

    async def _is_loop(self, headers: HeaderSection, envelope: Envelope) -> bool:
        """A loop is a mail carrying a Message-ID this bridge generated itself: only that (a
        Message-ID merely under our domain is not: Delta Chat writes <uuid@localhost>)."""
        for message_id in headers.all("message-id"):
            if message_id and await self.is_own_message_id(message_id):
                self.log.warning(
                    "Refused a message from %s carrying a Message-ID this bridge sent (mail loop)",
                    envelope.mail_from,
                )
                return True
        return False

    async def _enqueue(
        self,
        raw: bytes,
        session: Session,
        envelope: Envelope,
        recipients: list[LocalRecipient],
        verdict: AuthVerdict,
        headers: HeaderSection,
    ) -> str:
        mail_from = _reverse_path(envelope.mail_from)
        queue_id = await self.queue.enqueue(
            raw=raw,
            mail_from=mail_from,
            peer=_peer_ip(session),
            helo=session.host_name or "",
            auth=verdict.to_json(),
            recipients=[QueuedRecipient(r.user_id, r.recipient, r.tag) for r in recipients],
            order_key=_order_key(headers, mail_from),
        )
        # Counted once committed: refused or failed attempts don't use up the sender's quota.
        if mail_from:
            self.per_sender.hit(mail_from.lower())
        null_key = self._null_sender_key(mail_from, session)
        if null_key:
            self.per_null_sender_ip.hit(null_key)  # type: ignore[union-attr]
        for user_id in {r.user_id for r in recipients}:
            self.per_recipient.hit(user_id)
        MAIL_ACCEPTED.inc()
        self.on_queued()
        return queue_id


def _peer_ip(session: Session) -> str:
    return session.peer[0] if isinstance(session.peer, tuple) else str(session.peer)


def _reverse_path(address: str | None) -> str:
    """The envelope sender, "" for the null sender: aiosmtpd keeps `MAIL FROM:<>` as "<>"."""
    return "" if not address or address == "<>" else address


def _order_key(headers: HeaderSection, mail_from: str) -> str:
    """Which conversation a mail belongs to, as far as delivery order goes: its list, else its
    author. Deliberately coarse: it only decides what may be delivered in parallel."""
    list_id = (headers.first("list-id") or "").strip().lower()
    if list_id:
        return f"list:{list_id}"
    author = parseaddr(headers.first("from") or "")[1].lower()
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
    quiet_aiosmtpd_log()  # again: logging may have been configured since this module loaded
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
        "sessions": handler.sessions,
    }
    if tls_context:
        kwargs["tls_context"] = tls_context
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: protocol(handler, **kwargs), host=host, port=port)
