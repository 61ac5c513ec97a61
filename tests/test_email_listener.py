"""The SMTP/LMTP listener, in process: real aiosmtpd, real database, real DNS, real smtplib.

Everything is the production code — InboundQueue on SQLite, the Authenticator asking
tests/dnsserver.py, RecipientCheck with KnownMailboxes, SlidingWindow limits — except the
homeserver's user directory, which is a set of user IDs here (or None: "unreachable").
The client is the standard library's smtplib, run in a thread so the server can answer.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import smtplib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from mautrix.util.async_db import Database

from bridge.db import open_database
from bridge.email.auth import AuthConfig, Authenticator
from bridge.email.listener import InboundHandler, Sessions, start_listener
from bridge.email.mailbox import KnownMailboxes, RecipientCheck
from bridge.email.queue import InboundQueue
from bridge.email.ratelimit import SlidingWindow
from bridge.permissions import Permissions

from .dnsserver import DnsServer

DOMAIN = "bridge.test"  # the email domain, and the one our own Message-IDs use
HS = "hs.test"
ALICE, BOB, CAROL = (f"@{name}:{HS}" for name in ("alice", "bob", "carol"))
TO_ALICE, TO_BOB, TO_CAROL = (f"{name}@{DOMAIN}" for name in ("alice", "bob", "carol"))
NOBODY = f"nobody@{DOMAIN}"
SENDER = "bob@example.test"
HELO = "client.test"
MAX_SIZE = 8192


# Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dkim_key() -> bytes:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def dns_server(dkim_key: bytes) -> Iterator[DnsServer]:
    public = serialization.load_pem_private_key(dkim_key, None).public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with DnsServer() as server:
        # good.test: SPF allows this host (the client is 127.0.0.1), it signs, p=reject.
        server.txt("good.test", "v=spf1 ip4:127.0.0.1 -all")
        server.txt("sel._domainkey.good.test", f"v=DKIM1; p={base64.b64encode(der).decode()}")
        server.txt("_dmarc.good.test", "v=DMARC1; p=reject")
        # Domains that allow no host at all, with a strict and a lax DMARC policy.
        server.txt("reject.test", "v=spf1 -all")
        server.txt("_dmarc.reject.test", "v=DMARC1; p=reject")
        server.txt("relaxed.test", "v=spf1 -all")
        server.txt("_dmarc.relaxed.test", "v=DMARC1; p=none")
        yield server


@pytest.fixture(scope="module")
def authenticator(dns_server: DnsServer) -> Authenticator:
    return Authenticator(
        AuthConfig(dns_servers=["127.0.0.1"], dns_port=dns_server.port, dns_timeout=1.0)
    )


@dataclass(frozen=True)
class Tls:
    cert: str
    key: str
    der: bytes


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DOMAIN)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(DOMAIN)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    base = tmp_path_factory.mktemp("tls")
    (base / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (base / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Tls(str(base / "cert.pem"), str(base / "key.pem"), cert.public_bytes(
        serialization.Encoding.DER))


def directory(*users: str) -> Callable[[str], Awaitable[bool | None]]:
    """The homeserver's user directory: who exists. The only stand-in in this module."""

    async def user_exists(user_id: str) -> bool | None:
        return user_id in users

    return user_exists


async def unreachable(user_id: str) -> bool | None:
    """The homeserver's user directory while the homeserver is down."""
    return None


EVERYONE = directory(ALICE, BOB, CAROL)


@dataclass
class Listener:
    port: int
    db: Database
    server: asyncio.AbstractServer
    wakes: list[None] = field(default_factory=list)
    handler: InboundHandler | None = None
    own_ids: set[str] = field(default_factory=set)

    async def messages(self) -> list[dict[str, Any]]:
        rows = await self.db.fetch(
            "SELECT id, mail_from, peer, helo, auth, raw FROM inbound_message ORDER BY seq"
        )
        return [{**dict(r), "raw": bytes(r["raw"])} for r in rows]

    async def deliveries(self, message_id: str) -> list[tuple[str, str]]:
        rows = await self.db.fetch(
            "SELECT user_id, recipient FROM inbound_delivery WHERE message_id=$1 "
            "ORDER BY user_id",
            message_id,
        )
        return [(r["user_id"], r["recipient"]) for r in rows]

    async def count(self) -> int:
        return await self.db.fetchval("SELECT COUNT(*) FROM inbound_message")


Start = Callable[..., Awaitable[Listener]]


@pytest.fixture
async def start(tmp_path: Path, authenticator: Authenticator) -> AsyncIterator[Start]:
    servers: list[asyncio.AbstractServer] = []
    databases: list[Database] = []

    async def _start(
        *,
        user_exists: Callable[[str], Awaitable[bool | None]] = EVERYONE,
        lmtp: bool = False,
        max_size: int = MAX_SIZE,
        max_recipients: int = 10,
        per_sender: int = 100,
        per_recipient: int = 100,
        reject_dmarc_failures: bool = True,
        tls: Tls | None = None,
        db: Database | None = None,
        queue: InboundQueue | None = None,
        queue_pickle_key: str | None = None,
        sessions: Sessions | None = None,
        per_null_sender_ip: int = 100,
        max_header_size: int = 1024 * 1024,
        hold: tuple[int, int] = (500, 250 * 1024 * 1024),
    ) -> Listener:
        if db is None:
            db = await open_database(f"sqlite:{tmp_path / 'bridge.db'}")
            databases.append(db)
        wakes: list[None] = []
        # The Message-IDs the bridge generated (app.py: the outbox's message_id column).
        own_ids: set[str] = set()

        async def is_own_message_id(message_id: str) -> bool:
            return message_id.strip().strip("<>") in own_ids

        handler = InboundHandler(
            recipients=RecipientCheck(
                email_domain=DOMAIN,
                homeserver_domain=HS,
                permissions=Permissions({HS: "user"}, HS),
                user_exists=user_exists,
                reserved_localparts=lambda localpart: localpart == "cloakroom",
                known=KnownMailboxes(db),
            ),
            queue=queue or InboundQueue(db, pickle_key=queue_pickle_key),
            authenticator=authenticator,
            reject_dmarc_failures=reject_dmarc_failures,
            max_recipients=max_recipients,
            per_sender=SlidingWindow(per_sender),
            per_recipient=SlidingWindow(per_recipient),
            per_null_sender_ip=SlidingWindow(per_null_sender_ip),
            is_own_message_id=is_own_message_id,
            max_header_size=max_header_size,
            hold_max_messages=hold[0],
            hold_max_bytes=hold[1],
            # Loopback is every test client: exempt nothing, so per-IP limits apply to them.
            sessions=sessions or Sessions(exempt=[]),
            lmtp=lmtp,
            on_queued=lambda: wakes.append(None),
        )
        server = await start_listener(
            handler,
            host="127.0.0.1",
            port=0,
            lmtp=lmtp,
            max_size=max_size,
            hostname=DOMAIN,
            tls_cert=tls.cert if tls else "",
            tls_key=tls.key if tls else "",
        )
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return Listener(port, db, server, wakes, handler, own_ids)

    yield _start
    for server in servers:
        server.close()
        await server.wait_closed()
    for db in databases:
        await db.stop()


class Client:
    """A stdlib smtplib client; each command runs in a thread while the server runs here."""

    def __init__(self, smtp: smtplib.SMTP) -> None:
        self.smtp = smtp

    async def __call__(self, command: str, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(getattr(self.smtp, command), *args, **kwargs)


@asynccontextmanager
async def connect(port: int, *, lmtp: bool = False, ehlo: bool = True) -> AsyncIterator[Client]:
    def _connect() -> smtplib.SMTP:
        factory = smtplib.LMTP if lmtp else smtplib.SMTP
        smtp = factory("127.0.0.1", port, local_hostname=HELO, timeout=10)
        if ehlo:
            smtp.ehlo()  # LHLO for LMTP
        return smtp

    def _quit() -> None:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()

    smtp = await asyncio.to_thread(_connect)
    try:
        yield Client(smtp)
    finally:
        await asyncio.to_thread(_quit)


async def send(port: int, raw: bytes, rcpts: list[str], mail_from: str = SENDER) -> dict:
    """smtplib's sendmail: the refused recipients, or the smtplib error a client would get."""
    async with connect(port) as client:
        return await client("sendmail", mail_from, rcpts, raw)


def mail(
    sender: str = "Bob <bob@example.test>",
    *,
    message_id: str = "<m1@example.test>",
    body: str = "Hello Alice,\r\nsee you soon.\r\n",
) -> bytes:
    headers = [
        f"From: {sender}",
        f"To: {TO_ALICE}",
        "Subject: Lunch",
        "Date: Mon, 01 Jan 2024 12:00:00 +0000",
        f"Message-ID: {message_id}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


def lines(size: int) -> str:
    """A body of about `size` bytes in ordinary 78-byte lines."""
    return ("x" * 76 + "\r\n") * (size // 78 + 1)


def code_and_text(reply: tuple[int, bytes]) -> tuple[int, str]:
    return reply[0], reply[1].decode()


# SMTP: 250 means committed -------------------------------------------------------------------


async def test_smtp_250_comes_with_the_message_already_in_the_queue(
    start: Start, dkim_key: bytes
) -> None:
    listener = await start()
    # A leading dot (dot-stuffed on the wire), 8-bit text and a DKIM signature that must
    # still verify: the stored text is the message exactly as the client meant it.
    body = "Hello Alice,\r\n.dotted line\r\n..two dots\r\nGrüße\r\n"
    unsigned = mail("Bob <bob@good.test>", body=body)
    raw = dkim.sign(unsigned, b"sel", b"good.test", dkim_key, include_headers=[b"from",
                    b"to", b"subject", b"message-id"]) + unsigned
    async with connect(listener.port) as client:
        assert (await client("mail", "bounce@good.test"))[0] == 250
        assert (await client("rcpt", TO_ALICE))[0] == 250
        code, text = code_and_text(await client("data", raw))
        assert code == 250 and text.startswith("2.0.0 Queued as ")
        queue_id = text.removeprefix("2.0.0 Queued as ")
        # Before the client even says QUIT, the reply's queue ID is a committed row.
        (stored,) = await listener.messages()
    assert stored["id"] == queue_id
    assert stored["raw"] == raw
    assert (stored["mail_from"], stored["peer"], stored["helo"]) == (
        "bounce@good.test",
        "127.0.0.1",
        HELO,
    )
    assert json.loads(stored["auth"]) == {
        "from_domain": "good.test",
        "spf": "pass",
        "spf_domain": "good.test",
        "dkim": "pass",
        "dkim_domains": ["good.test"],
        "dmarc": "pass",
        "dmarc_policy": "reject",
        "source": "checked",
        "from_address": "bob@good.test",
    }
    assert await listener.deliveries(queue_id) == [(ALICE, TO_ALICE)]
    assert len(listener.wakes) == 1


async def test_smtp_each_message_of_a_session_is_queued(start: Start) -> None:
    listener = await start()
    async with connect(listener.port) as client:
        for n, rcpts in enumerate([[TO_ALICE], [TO_BOB, "Alice+News@Bridge.Test"]]):
            raw = mail(message_id=f"<s{n}@example.test>")
            assert await client("sendmail", SENDER, rcpts, raw) == {}
    first, second = await listener.messages()
    assert await listener.deliveries(first["id"]) == [(ALICE, TO_ALICE)]
    assert await listener.deliveries(second["id"]) == [
        (ALICE, f"Alice+News@{DOMAIN}"),
        (BOB, TO_BOB),
    ]
    assert len(listener.wakes) == 2


# LMTP: one status line per accepted recipient ------------------------------------------------


async def test_lmtp_answers_once_per_accepted_recipient(start: Start) -> None:
    listener = await start(lmtp=True)
    async with connect(listener.port, lmtp=True) as client:
        assert (await client("mail", SENDER))[0] == 250
        assert (await client("rcpt", TO_ALICE))[0] == 250
        assert code_and_text(await client("rcpt", NOBODY)) == (550, "5.1.1 No such mailbox here")
        assert (await client("rcpt", TO_BOB))[0] == 250
        # smtplib.LMTP.sendmail reads only one reply after DATA, so read the rest by hand.
        first = code_and_text(await client("data", mail()))
        second = code_and_text(await client("getreply"))
        # The next reply belongs to NOOP: there is no third DATA line (none for NOBODY).
        assert code_and_text(await client("noop")) == (250, "OK")
    (stored,) = await listener.messages()
    assert first == second == (250, f"2.0.0 Queued as {stored['id']}")
    assert await listener.deliveries(stored["id"]) == [(ALICE, TO_ALICE), (BOB, TO_BOB)]


@pytest.mark.parametrize(
    ("body", "reply"),
    [
        (lines(MAX_SIZE), (552, "5.3.4 Message too big for this server")),
        ("x" * 2000 + "\r\n", (500, "Line too long (see RFC5321 4.5.3.1.6)")),
    ],
    ids=["too-big", "line-too-long"],
)
async def test_lmtp_refused_data_is_answered_once_per_recipient(
    start: Start, body: str, reply: tuple[int, str]
) -> None:
    listener = await start(lmtp=True)
    async with connect(listener.port, lmtp=True) as client:
        await client("mail", SENDER)
        await client("rcpt", TO_ALICE)
        await client("rcpt", NOBODY)
        await client("rcpt", TO_BOB)
        replies = [code_and_text(await client("data", mail(body=body)))]
        replies.append(code_and_text(await client("getreply")))
        assert code_and_text(await client("noop")) == (250, "OK")
    assert replies == [reply, reply]
    assert await listener.count() == 0


async def test_lmtp_greeting_is_lhlo(start: Start) -> None:
    listener = await start(lmtp=True)
    async with connect(listener.port, lmtp=True, ehlo=False) as client:
        assert (await client("docmd", "EHLO", HELO))[0] == 500
        assert (await client("docmd", "LHLO", HELO))[0] == 250


# STARTTLS -------------------------------------------------------------------------------------


async def test_starttls_with_a_self_signed_certificate(start: Start, tls: Tls) -> None:
    listener = await start(tls=tls)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with connect(listener.port) as client:
        assert client.smtp.has_extn("starttls")
        assert (await client("starttls", context=context))[0] == 220
        assert isinstance(client.smtp.sock, ssl.SSLSocket)
        assert client.smtp.sock.getpeercert(binary_form=True) == tls.der
        await client("ehlo")
        assert not client.smtp.has_extn("starttls")
        assert await client("sendmail", SENDER, [TO_ALICE], mail()) == {}
    (stored,) = await listener.messages()
    assert stored["raw"] == mail()


async def test_no_starttls_without_a_certificate(start: Start) -> None:
    listener = await start()
    async with connect(listener.port) as client:
        assert not client.smtp.has_extn("starttls")
        assert (await client("docmd", "STARTTLS"))[0] != 220


# Loops ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message_id", "own", "queued"),
    [
        ("<reply-1@bridge.test>", True, False),
        ("  <reply-1@bridge.test>  ", True, False),
        # Under our domain but not one we generated: Delta Chat writes <uuid@localhost>, and
        # the quickstart's domain is localhost. Not a loop.
        ("<3f0c5a0e-1b7e-4c55-9d8e-2f1d3c4b5a69@bridge.test>", False, True),
        ("<reply-1@example.test>", False, True),
    ],
    ids=["ours", "ours-spaces", "our-domain-not-ours", "elsewhere"],
)
async def test_a_loop_is_only_our_own_message_id_and_is_refused_not_dropped(
    start: Start, message_id: str, own: bool, queued: bool
) -> None:
    listener = await start()
    listener.own_ids.add("reply-1@bridge.test")
    async with connect(listener.port) as client:
        await client("mail", SENDER)
        await client("rcpt", TO_ALICE)
        reply = code_and_text(await client("data", mail(message_id=message_id)))
    if queued:
        assert reply[0] == 250 and reply[1].startswith("2.0.0 Queued as "), reply
    else:
        # Refused with a status, never "250 … dropped": the sending side keeps the message.
        assert reply == (554, "5.4.6 Routing loop detected: this message was sent by this server")
    assert await listener.count() == int(queued)
    assert len(listener.wakes) == int(queued)


# DMARC ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "reject_dmarc_failures", "code", "verdict"),
    [
        ("reject.test", True, 550, None),
        ("reject.test", False, 250, ("fail", "fail", "reject")),
        ("relaxed.test", True, 250, ("fail", "fail", "none")),
    ],
)
async def test_dmarc_reject_policy_refuses_at_data(
    start: Start,
    domain: str,
    reject_dmarc_failures: bool,
    code: int,
    verdict: tuple[str, str, str] | None,
) -> None:
    listener = await start(reject_dmarc_failures=reject_dmarc_failures)
    async with connect(listener.port) as client:
        await client("mail", f"ceo@{domain}")
        await client("rcpt", TO_ALICE)
        reply = code_and_text(await client("data", mail(f"CEO <ceo@{domain}>")))
    assert reply[0] == code
    if verdict is None:
        assert reply[1].startswith(f"5.7.1 Rejected: {domain} asks to refuse mail")
        assert await listener.count() == 0
        assert listener.wakes == []
        return
    (stored,) = await listener.messages()
    auth = json.loads(stored["auth"])
    assert (auth["spf"], auth["dmarc"], auth["dmarc_policy"]) == verdict
    assert (auth["from_domain"], auth["dkim"]) == (domain, "none")


# Rate limits ----------------------------------------------------------------------------------


async def test_per_sender_limit_refuses_at_mail(start: Start) -> None:
    listener = await start(per_sender=2)
    for n in range(2):
        assert await send(listener.port, mail(message_id=f"<r{n}@example.test>"), [TO_ALICE]) == {}
    async with connect(listener.port) as client:
        for sender in (SENDER, SENDER.upper()):
            code, text = code_and_text(await client("mail", sender))
            assert (code, text[:6]) == (451, "4.7.1 "), text
            await client("rset")
        # Another sender is not affected.
        assert (await client("mail", "carol@example.test"))[0] == 250
    assert await listener.count() == 2


async def test_per_recipient_limit_refuses_at_rcpt(start: Start) -> None:
    listener = await start(per_recipient=2)
    for _ in range(2):
        assert await send(listener.port, mail(), [TO_ALICE]) == {}
    # Alice (with or without a tag) is refused; Bob, in the same message, is not.
    refused = await send(listener.port, mail(), [TO_ALICE, f"alice+x@{DOMAIN}", TO_BOB])
    assert {rcpt: (code, text[:6]) for rcpt, (code, text) in refused.items()} == {
        TO_ALICE: (451, b"4.7.1 "),
        f"alice+x@{DOMAIN}": (451, b"4.7.1 "),
    }
    last = (await listener.messages())[-1]
    assert await listener.deliveries(last["id"]) == [(BOB, TO_BOB)]


async def test_rate_limits_count_only_accepted_mail(start: Start) -> None:
    listener = await start(per_sender=1, per_recipient=1, max_size=2000)
    spoofer = "ceo@reject.test"
    async with connect(listener.port) as client:
        for _ in range(3):
            # Refused at DATA by DMARC, each time: neither the sender's nor Alice's quota is used.
            await client("mail", spoofer)
            await client("rcpt", TO_ALICE)
            assert (await client("data", mail(f"CEO <{spoofer}>")))[0] == 550
        for _ in range(3):
            # Too big, or no valid recipient: not counted either.
            await client("mail", SENDER)
            await client("rcpt", TO_ALICE)
            assert (await client("data", mail(body=lines(3000))))[0] == 552
            await client("mail", SENDER)
            assert (await client("rcpt", NOBODY))[0] == 550
            await client("rset")
        # So the first accepted message is still within both limits...
        assert await client("sendmail", SENDER, [TO_ALICE], mail()) == {}
        # ...and now both are used up.
        assert (await client("mail", SENDER))[0] == 451
        assert (await client("mail", "carol@example.test"))[0] == 250
        assert (await client("rcpt", TO_ALICE))[0] == 451
    assert await listener.count() == 1



async def test_null_sender_is_stored_empty_and_not_limited_as_one_sender(start: Start) -> None:
    # Bounces from anywhere all say MAIL FROM:<>; they are not one sender sharing one quota.
    listener = await start(per_sender=1, per_recipient=3)
    for n in range(3):
        bounce = mail(f"MAILER-DAEMON <daemon@mx{n}.example.test>", message_id=f"<b{n}@x.test>")
        assert await send(listener.port, bounce, [TO_ALICE], mail_from="") == {}
    assert [m["mail_from"] for m in await listener.messages()] == ["", "", ""]
    # The recipient's limit still applies to them.
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        await send(listener.port, mail(), [TO_ALICE], mail_from="")

# Homeserver unreachable -----------------------------------------------------------------------


async def test_unreachable_homeserver_accepts_known_mailboxes_only(start: Start) -> None:
    first = await start(user_exists=directory(ALICE, BOB))
    assert await send(first.port, mail(), [TO_ALICE]) == {}  # Alice is now a known mailbox
    first.server.close()
    await first.server.wait_closed()

    # The bridge restarts (no cache) while the homeserver is down.
    listener = await start(user_exists=unreachable, db=first.db)
    async with connect(listener.port) as client:
        await client("mail", SENDER)
        assert code_and_text(await client("rcpt", TO_BOB)) == (
            451,
            "4.4.3 Cannot check this mailbox right now; try again later",
        )
        assert code_and_text(await client("rcpt", f"Alice+tag@{DOMAIN}")) == (
            250,
            "2.1.5 Recipient OK",
        )
        assert (await client("data", mail(message_id="<down@example.test>")))[0] == 250
    last = (await listener.messages())[-1]
    assert await listener.deliveries(last["id"]) == [(ALICE, f"Alice+tag@{DOMAIN}")]


# Limits on recipients and size ----------------------------------------------------------------


async def test_too_many_recipients(start: Start) -> None:
    listener = await start(max_recipients=2)
    # A refused recipient does not take a place; the third accepted one would.
    refused = await send(listener.port, mail(), [NOBODY, TO_ALICE, TO_BOB, TO_CAROL])
    assert refused == {
        NOBODY: (550, b"5.1.1 No such mailbox here"),
        TO_CAROL: (452, b"4.5.3 Too many recipients"),
    }
    (stored,) = await listener.messages()
    assert await listener.deliveries(stored["id"]) == [(ALICE, TO_ALICE), (BOB, TO_BOB)]


@pytest.mark.parametrize(
    ("size", "code"), [(MAX_SIZE - 1, 250), (MAX_SIZE, 250), (MAX_SIZE + 1, 552)]
)
async def test_declared_size_over_the_limit_is_refused_at_mail(
    start: Start, size: int, code: int
) -> None:
    listener = await start()
    async with connect(listener.port) as client:
        assert client.smtp.has_extn("size")
        assert client.smtp.esmtp_features["size"] == str(MAX_SIZE)
        reply = code_and_text(await client("mail", SENDER, [f"SIZE={size}"]))
    assert reply[0] == code
    if code == 552:
        assert reply[1] == "5.3.4 Message too big for this server"


async def test_sendmail_of_an_oversize_message_is_refused(start: Start) -> None:
    listener = await start()
    # smtplib declares SIZE itself, so the refusal comes at MAIL.
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await send(listener.port, mail(body=lines(MAX_SIZE)), [TO_ALICE])
    assert (refused.value.smtp_code, refused.value.smtp_error) == (
        552,
        b"5.3.4 Message too big for this server",
    )
    assert await listener.count() == 0


async def test_data_over_the_limit_is_refused_and_not_queued(start: Start) -> None:
    listener = await start()
    small = mail(body=lines(MAX_SIZE - 1000))
    big = mail(body=lines(MAX_SIZE))
    async with connect(listener.port) as client:
        # No SIZE declared: the server only finds out while reading the data.
        await client("mail", SENDER)
        await client("rcpt", TO_ALICE)
        assert code_and_text(await client("data", big)) == (
            552,
            "5.3.4 Message too big for this server",
        )
        # The session goes on; a message within the limit is accepted.
        await client("mail", SENDER)
        await client("rcpt", TO_ALICE)
        assert (await client("data", small))[0] == 250
    (stored,) = await listener.messages()
    assert stored["raw"] == small


# Database failure -----------------------------------------------------------------------------


async def _stop(db: Database) -> None:
    await db.stop()


async def _rename_deliveries(db: Database) -> None:
    # The message row is written first, the delivery rows fail: all of it must roll back.
    await db.execute("ALTER TABLE inbound_delivery RENAME TO inbound_delivery_away")


@pytest.mark.parametrize("lmtp", [False, True], ids=["smtp", "lmtp"])
@pytest.mark.parametrize("break_db", [_stop, _rename_deliveries], ids=["stopped", "no-table"])
async def test_database_failure_at_data_is_a_temporary_error(
    start: Start,
    tmp_path: Path,
    lmtp: bool,
    break_db: Callable[[Database], Awaitable[None]],
) -> None:
    listener = await start(lmtp=lmtp, per_sender=1)
    async with connect(listener.port, lmtp=lmtp) as client:
        await client("mail", SENDER)
        await client("rcpt", TO_ALICE)
        await client("rcpt", TO_BOB)
        await break_db(listener.db)
        replies = [code_and_text(await client("data", mail()))]
        if lmtp:
            replies.append(code_and_text(await client("getreply")))
        # The session survives; the failed attempt did not use up the sender's quota.
        assert code_and_text(await client("noop")) == (250, "OK")
        assert (await client("mail", SENDER))[0] == 250
    for code, text in replies:
        assert code == 451, text
        assert text.startswith("4.3.0 ") and "Traceback" not in text, text
    assert listener.wakes == []
    if break_db is _rename_deliveries:
        await listener.db.execute("ALTER TABLE inbound_delivery_away RENAME TO inbound_delivery")
        assert await listener.count() == 0
    else:
        db = await open_database(f"sqlite:{tmp_path / 'bridge.db'}")
        try:
            assert await db.fetchval("SELECT COUNT(*) FROM inbound_message") == 0
        finally:
            await db.stop()


# Quota: mail held for a mailbox whose owner has no device yet --------------------------------


@pytest.mark.parametrize("hold", [(2, 10**9), (100, 400)], ids=["messages", "bytes"])
async def test_a_full_mailbox_is_refused_at_rcpt(start: Start, hold: tuple[int, int]) -> None:
    listener = await start(hold=hold)
    for n in range(2):
        assert await send(listener.port, mail(message_id=f"<h{n}@example.test>"), [TO_ALICE]) == {}
    # Alice has no device that can decrypt: her mail waits, and now fills her mailbox.
    queue = listener.handler.queue
    assert await queue.hold_user(ALICE) == 2
    refused = await send(listener.port, mail(), [TO_ALICE, TO_BOB])
    assert refused == {TO_ALICE: (452, b"4.2.2 Mailbox full; try again later")}
    last = (await listener.messages())[-1]
    assert await listener.deliveries(last["id"]) == [(BOB, TO_BOB)]


# The null sender: bounces are limited per peer address ---------------------------------------


async def test_the_null_sender_is_limited_per_peer_address(start: Start) -> None:
    listener = await start(per_sender=100, per_null_sender_ip=2)
    for n in range(2):
        assert await send(listener.port, mail(message_id=f"<n{n}@x.test>"), [TO_ALICE],
                          mail_from="") == {}
    async with connect(listener.port) as client:
        code, text = code_and_text(await client("docmd", "MAIL FROM:<>"))
        assert (code, text[:6]) == (451, "4.7.1 "), text
        await client("rset")
        # A real sender from the same address is not affected.
        assert (await client("mail", SENDER))[0] == 250
    assert await listener.count() == 2


async def test_an_exempt_network_is_not_limited_per_address(start: Start) -> None:
    listener = await start(per_null_sender_ip=1, sessions=Sessions(exempt=["127.0.0.0/8"]))
    for n in range(3):
        assert await send(listener.port, mail(message_id=f"<e{n}@x.test>"), [TO_ALICE],
                          mail_from="") == {}


# Connections ----------------------------------------------------------------------------------


async def _greeting(port: int) -> tuple[int, str]:
    """The server's greeting to a new connection (smtplib raises on anything but 220)."""
    try:
        async with connect(port, ehlo=False) as client:
            return 220, client.smtp.sock.getpeername()[0]
    except smtplib.SMTPConnectError as e:
        return e.smtp_code, e.smtp_error.decode()


async def test_connections_over_the_limit_are_greeted_421(start: Start) -> None:
    sessions = Sessions(max_connections=2, exempt=[])
    listener = await start(sessions=sessions)
    async with connect(listener.port), connect(listener.port):
        assert await _greeting(listener.port) == (
            421, "4.7.0 Too many connections; try again later"
        )
    # Both sessions ended: a new one is welcome again.
    await asyncio.wait_for(sessions._empty.wait(), 10)
    assert (await _greeting(listener.port))[0] == 220


async def test_connections_per_address_are_rate_limited(start: Start) -> None:
    sessions = Sessions(per_ip=SlidingWindow(2, 60.0), exempt=[])
    listener = await start(sessions=sessions)
    assert [(await _greeting(listener.port))[0] for _ in range(2)] == [220, 220]
    assert await _greeting(listener.port) == (
        421, "4.7.0 Too many connections from your address; try again later"
    )


# Logs: no mail content, at any level --------------------------------------------------------


async def test_no_mail_content_in_the_logs_even_at_debug(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import logging.config

    # The admin configures DEBUG everywhere, aiosmtpd's own logger included.
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "loggers": {"mail": {"level": "DEBUG"}, "mail.log": {"level": "DEBUG"}},
    })
    caplog.set_level(logging.DEBUG)
    secret = "Kv7-the-secret-body-line"
    try:
        # As in production, the queue seals raw mail (aiosqlite logs every query's arguments
        # at DEBUG; that is the database layer's own logger, outside this test's subject).
        listener = await start(queue_pickle_key="test pickle key")
        raw = mail(body=f"{secret}\r\nsecond line\r\n")
        assert await send(listener.port, raw, [TO_ALICE]) == {}
    finally:
        from bridge.email.listener import quiet_aiosmtpd_log

        quiet_aiosmtpd_log()
    assert await listener.count() == 1
    assert secret not in caplog.text
    assert "Subject: Lunch" not in caplog.text
    assert not [r for r in caplog.records if r.name == "mail.log" and r.levelno < logging.WARNING]


# Stopping: 421 4.3.2 to every session, a DATA in progress finished first ---------------------


async def _drain(listener: Listener, timeout: float = 10.0) -> None:
    """What InboundMail.drain does around the sessions: drain, then close the server."""
    await listener.handler.sessions.drain(timeout)
    listener.server.close()
    await listener.server.wait_closed()


async def test_stopping_finishes_the_data_in_progress_and_says_421_to_everyone(
    start: Start,
) -> None:
    listener = await start()
    async with connect(listener.port) as idle, connect(listener.port) as busy:
        await busy("mail", SENDER)
        await busy("rcpt", TO_ALICE)
        await busy("putcmd", "data")
        assert (await busy("getreply"))[0] == 354  # the server is now inside DATA
        await busy("send", b"From: Bob <bob@example.test>\r\nSubject: Half\r\n\r\nfirst half\r\n")
        drain = asyncio.create_task(_drain(listener))
        # An idle session hears 421 at its next command; so does a new connection.
        assert code_and_text(await idle("noop")) == (421, "4.3.2 Service shutting down")
        assert await _greeting(listener.port) == (421, "4.3.2 Service shutting down")
        assert not drain.done()
        # The message being received is finished, committed and answered 250.
        await busy("send", b"second half\r\n.\r\n")
        code, text = code_and_text(await busy("getreply"))
        assert code == 250 and text.startswith("2.0.0 Queued as "), text
        assert code_and_text(await busy("noop")) == (421, "4.3.2 Service shutting down")
        await drain
    (stored,) = await listener.messages()
    assert stored["raw"].endswith(b"first half\r\nsecond half\r\n")
    assert listener.handler.sessions.open == set()


async def test_stopping_waits_a_bounded_time_for_a_stalled_session(start: Start) -> None:
    listener = await start()
    async with connect(listener.port) as stalled:
        await stalled("mail", SENDER)
        await stalled("rcpt", TO_ALICE)
        await stalled("putcmd", "data")
        assert (await stalled("getreply"))[0] == 354
        await stalled("send", b"Subject: never finished\r\n")
        await _drain(listener, timeout=0.2)  # returns although the client never ends its DATA
        try:
            await stalled("send", b"more\r\n.\r\n")
            reply = code_and_text(await stalled("getreply"))
        except (smtplib.SMTPServerDisconnected, OSError):
            reply = None  # closed before the client could even write
        # Told why, if it could still hear it; never a 250 for data that was not committed.
        assert reply in (None, (421, "4.3.2 Service shutting down"))
    assert listener.handler.sessions.open == set()
    assert await listener.count() == 0


async def test_a_dictionary_attack_is_cut_off_after_20_refused_recipients(start: Start) -> None:
    asked: list[str] = []

    async def user_exists(user_id: str) -> bool | None:
        asked.append(user_id)
        return user_id == ALICE

    listener = await start(user_exists=user_exists)
    async with connect(listener.port) as client:
        await client("mail", SENDER)
        replies = [code_and_text(await client("rcpt", f"guess{n}@{DOMAIN}")) for n in range(19)]
        assert {code for code, _ in replies} == {550}
        assert code_and_text(await client("rcpt", f"guess19@{DOMAIN}")) == (
            421, "4.7.0 Too many refused recipients; closing the connection"
        )
        with pytest.raises((smtplib.SMTPServerDisconnected, OSError)):
            await client("rcpt", f"guess20@{DOMAIN}")
    assert len(asked) == 20  # the homeserver was asked no more than that
