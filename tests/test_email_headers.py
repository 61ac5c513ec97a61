"""One parse, one truth: the From a mail is authenticated as is the From its reader is shown.

The attack: ``X-Foo: bar\\rFrom: Bob <bob@victim.test>`` then ``From: eve@evil.test``, signed by
Eve's own (valid) DKIM key. Our header reading and dkimpy split lines on CRLF only and see one
From, Eve's; the standard library, which builds what the user sees, also breaks lines at a bare
CR (and \\n, \\x0b, \\x0c, \\x1c–\\x1e) and shows Bob. Such header sections are refused at DATA, and
a verdict warns whenever the shown address is not the one it proved.

Component tests: the real listener on loopback (tests/test_email_listener.py's fixtures), real
DNS, real DKIM signatures, and the formatter's own parse_mail to show what a reader would see.
"""

from __future__ import annotations

import dkim
import pytest

from bridge.email.auth import AuthConfig, Authenticator, AuthVerdict
from bridge.formatter.from_email import parse_mail

from . import test_email_listener as _listener
from .dnsserver import DnsServer
from .test_email_listener import TO_ALICE, Start, code_and_text, connect

# The listener tests' fixtures: a real listener on loopback, its DKIM key and DNS server.
start = _listener.start
dkim_key = _listener.dkim_key
dns_server = _listener.dns_server

BREAKS = ["\r", "\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
TRUSTED = "mx.bridge.test"


@pytest.fixture(scope="module")
def authenticator(dns_server: DnsServer) -> Authenticator:
    # As in the listener tests, plus a trusted MTA id (its header is only believed when present).
    dns_server.txt("evil.test", "v=spf1 ip4:127.0.0.1 -all")
    dns_server.txt("_dmarc.evil.test", "v=DMARC1; p=none")
    dns_server.txt("_dmarc.victim.test", "v=DMARC1; p=reject")
    return Authenticator(
        AuthConfig(
            dns_servers=["127.0.0.1"],
            dns_port=dns_server.port,
            dns_timeout=1.0,
            trusted_authserv_id=TRUSTED,
        )
    )


def _signed(headers: list[str], key: bytes, domain: str = "good.test") -> bytes:
    raw = ("\r\n".join(headers) + "\r\n\r\nWire the money today.\r\n").encode()
    try:
        signature = dkim.sign(
            raw, b"sel", domain.encode(), key, include_headers=[b"from", b"subject"]
        )
    except (dkim.DKIMException, IndexError):
        return raw  # dkimpy cannot even sign it; SPF for good.test still passes from loopback
    return signature + raw


async def _data(start: Start, raw: bytes, mail_from: str = "eve@good.test") -> tuple[int, str]:
    listener = await start()
    async with connect(listener.port) as client:
        assert (await client("mail", mail_from))[0] == 250
        assert (await client("rcpt", TO_ALICE))[0] == 250
        reply = code_and_text(await client("data", raw))
    if reply[0] != 250:
        assert await listener.count() == 0 and listener.wakes == []
    return reply


@pytest.mark.parametrize("brk", BREAKS, ids=[f"{ord(b):#04x}" for b in BREAKS])
async def test_a_header_line_break_other_than_crlf_is_refused_at_data(
    start: Start, dkim_key: bytes, brk: str
) -> None:
    # Eve's DKIM (good.test, in the listener tests' DNS) is valid; the hidden From is Bob's.
    raw = _signed(
        [f"X-Foo: bar{brk}From: Bob <bob@victim.test>", "From: Eve <eve@good.test>", "Subject: Hi"],
        dkim_key,
    )
    if brk in "\r\n":
        # The premise: the reader's parser shows Bob, the authenticated From is Eve's. (The
        # email package of this Python breaks header lines at CR and LF only; str.splitlines,
        # which other versions and code paths use, also breaks at the rest, so they are refused
        # alike.)
        assert parse_mail(raw).from_.address == "bob@victim.test"
    code, text = await _data(start, raw)
    assert code == 550 and text.startswith("5.6.0 Malformed header section"), text


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        (["From: a@good.test", "From: b@victim.test"], "exactly one From"),
        (["Sender: a@good.test"], "exactly one From"),
        (["From: a@good.test", "X Foo: the stdlib ends the header section here"], "not a header"),
        (["From : Bob <bob@victim.test>", "From: eve@good.test"], "not a header field"),
        ([" folded: before any field", "From: eve@good.test"], "not a header field"),
    ],
    ids=["two-froms", "no-from", "space-in-name", "space-before-colon", "leading-continuation"],
)
async def test_a_header_section_parsers_could_disagree_on_is_refused(
    start: Start, dkim_key: bytes, headers: list[str], why: str
) -> None:
    code, text = await _data(start, _signed([*headers, "Subject: Hi"], dkim_key))
    assert code == 550 and text.startswith("5.6.0 Malformed header section"), text
    assert why in text


async def test_the_header_section_size_is_limited(start: Start) -> None:
    listener = await start(max_header_size=2048, max_size=64 * 1024)
    pad = b"X-Pad: " + b"x" * 70 + b"\r\n"  # 79 bytes a line
    ok = b"From: bob@example.test\r\n" + pad * 24 + b"\r\nbody\r\n" + pad * 100
    big = b"From: bob@example.test\r\n" + pad * 27 + b"\r\nbody\r\n"
    async with connect(listener.port) as client:
        for raw, code in ((big, 552), (ok, 250)):
            await client("mail", "bob@example.test")
            await client("rcpt", TO_ALICE)
            reply = code_and_text(await client("data", raw))
            assert reply[0] == code, reply
    assert reply[0] == 250
    assert await listener.count() == 1


async def test_a_well_formed_mail_is_accepted_and_read_alike(start: Start, dkim_key: bytes) -> None:
    raw = _signed(["From: Eve <eve@good.test>", "Subject: Hi", "X-Long: a\r\n\tfolded value"],
                  dkim_key)
    listener = await start()
    async with connect(listener.port) as client:
        assert await client("sendmail", "eve@good.test", [TO_ALICE], raw) == {}
    (stored,) = await listener.messages()
    verdict = AuthVerdict.from_json(__import__("json").loads(stored["auth"]))
    shown = parse_mail(stored["raw"]).from_.address
    assert (verdict.from_address, verdict.from_domain, shown) == (
        "eve@good.test",
        "good.test",
        "eve@good.test",
    )
    assert verdict.marker(shown) is None


# The verdict and what is shown -----------------------------------------------------------------


def _passing(domain: str = "evil.example", address: str = "eve@evil.example") -> AuthVerdict:
    return AuthVerdict(
        from_domain=domain,
        spf="pass",
        spf_domain=domain,
        dkim="pass",
        dkim_domains=[domain],
        dmarc="pass",
        dmarc_policy="none",
        source="checked",
        from_address=address,
    )


@pytest.mark.parametrize(
    "shown", ["bob@victim.example", "ceo@bank.example", "eve@evil.example.attacker.test"]
)
def test_marker_warns_strongly_when_the_shown_domain_is_not_the_proven_one(shown: str) -> None:
    verdict = _passing()
    assert verdict.authenticated  # evil.example really is proven...
    marker = verdict.marker(shown)  # ...but the reader is shown someone else
    assert marker is not None and "WARNING" in marker and "forgery" in marker
    assert shown in marker and "eve@evil.example" in marker


@pytest.mark.parametrize("shown", ["eve@evil.example", "Eve@EVIL.example", "other@evil.example."])
def test_marker_is_silent_for_the_proven_domain(shown: str) -> None:
    assert _passing().marker(shown) is None


def test_marker_compares_internationalised_domains_as_a_labels() -> None:
    verdict = _passing("xn--bcher-kva.example", "eve@xn--bcher-kva.example")
    assert verdict.marker("eve@bücher.example") is None
    assert verdict.marker("eve@bucher.example") is not None


def _trusted_mail(auth_results: str, sender: str) -> bytes:
    return (
        f"Authentication-Results: {auth_results}\r\nFrom: {sender}\r\nSubject: Hi\r\n\r\nx\r\n"
    ).encode()


async def test_trusted_dmarc_pass_for_another_header_from_is_not_believed(
    authenticator: Authenticator,
) -> None:
    raw = _trusted_mail(
        f"{TRUSTED}; spf=pass smtp.mailfrom=evil.example; dkim=pass header.d=evil.example;"
        " dmarc=pass header.from=evil.example",
        "CEO <ceo@bank.example>",
    )
    verdict = await authenticator.check(raw, mail_from="", peer_ip="127.0.0.1", helo="mx")
    assert verdict.source == "trusted-header"
    assert (verdict.from_domain, verdict.from_address) == ("bank.example", "ceo@bank.example")
    assert not verdict.authenticated and not verdict.vouches_for("ceo@bank.example")
    assert verdict.marker("ceo@bank.example") is not None


async def test_trusted_dmarc_without_header_from_is_not_believed(
    authenticator: Authenticator,
) -> None:
    raw = _trusted_mail(f"{TRUSTED}; dmarc=pass", "CEO <ceo@bank.example>")
    verdict = await authenticator.check(raw, mail_from="", peer_ip="127.0.0.1", helo="mx")
    assert verdict.dmarc == "permerror" and not verdict.authenticated


async def test_trusted_dmarc_pass_for_the_same_from_is_believed(
    authenticator: Authenticator,
) -> None:
    raw = _trusted_mail(f"{TRUSTED}; dmarc=pass header.from=Bank.Example", "ceo@bank.example")
    verdict = await authenticator.check(raw, mail_from="", peer_ip="127.0.0.1", helo="mx")
    assert verdict.authenticated and verdict.marker("ceo@bank.example") is None


async def test_trusted_versioned_dmarc_failure_with_p_reject_is_refused(start: Start) -> None:
    # RFC 8601 allows a method version with spaces: "dmarc / 1 = fail". It was read as a
    # method called "1", so this p=reject failure was delivered.
    raw = _trusted_mail(
        f"{TRUSTED}; dmarc / 1 = fail (p=reject dis=none) header.from=victim.test",
        "Boss <boss@victim.test>",
    )
    code, text = await _data(start, raw, mail_from="boss@victim.test")
    assert code == 550 and text.startswith("5.7.1 Rejected: victim.test"), text
