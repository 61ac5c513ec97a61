"""Sender authentication against real DNS: a loopback server answers with per-test records.

Nothing here is mocked: the resolver sends real queries to tests/dnsserver.py, DKIM signatures
are made with a key generated for the run, and verdicts come out of the real checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import dkim
import dns.nameserver
import dns.resolver
import pytest
import spf as pyspf

from bridge.config import Config, ConfigError
from bridge.email.auth import AuthConfig, Authenticator, AuthVerdict, DnsTempError, Resolver
from bridge.email.auth.dmarc import DmarcRecord
from bridge.email.auth.results import parse
from bridge.email.auth.spf import check_spf

from .dkimkeys import Key, make_key
from .dnsserver import DnsServer

ATTACKER_IP = "203.0.113.66"


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as dns_server:
        yield dns_server


@pytest.fixture(scope="session")
def key() -> Key:
    return make_key()


def authenticator(server: DnsServer, timeout: float = 2.0, **config: object) -> Authenticator:
    return Authenticator(
        AuthConfig(dns_servers=["127.0.0.1"], dns_port=server.port, dns_timeout=timeout, **config)
    )


def message(
    sender: str = "Bob <bob@example.test>",
    body: str = "Hello Alice,\r\nsee you soon.\r\n",
    extra: tuple[str, ...] = (),
) -> bytes:
    headers = [
        *extra,
        f"From: {sender}",
        "To: alice@bridge.test",
        "Subject: Lunch",
        "Date: Mon, 01 Jan 2024 12:00:00 +0000",
        "Message-ID: <lunch-1@example.test>",
    ]
    return ("\r\n".join(headers) + "\r\n\r\n" + body).encode()


def sign(raw: bytes, key: Key, domain: str, selector: str = "sel") -> bytes:
    signature = dkim.sign(
        raw,
        selector.encode(),
        domain.encode(),
        key.private_pem,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return signature + raw


# SPF ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpfCase:
    records: dict[str, list[str]]  # TXT records
    ip: str
    mail_from: str
    expected: str
    a: dict[str, list[str]] = field(default_factory=dict)
    aaaa: dict[str, list[str]] = field(default_factory=dict)
    mx: dict[str, list[str]] = field(default_factory=dict)
    helo: str = "mail.client.test"


_CHAIN = {f"l{i}.chain.test": [f"v=spf1 include:l{i + 1}.chain.test -all"] for i in range(12)}
SPF_CASES = {
    "pass": SpfCase({"p.test": ["v=spf1 ip4:192.0.2.0/24 -all"]}, "192.0.2.7", "a@p.test", "pass"),
    "fail": SpfCase({"f.test": ["v=spf1 ip4:192.0.2.0/24 -all"]}, ATTACKER_IP, "a@f.test", "fail"),
    "softfail": SpfCase(
        {"s.test": ["v=spf1 ip4:192.0.2.1 ~all"]}, ATTACKER_IP, "a@s.test", "softfail"
    ),
    "neutral": SpfCase({"n.test": ["v=spf1 ?all"]}, ATTACKER_IP, "a@n.test", "neutral"),
    "no-match-is-neutral": SpfCase(
        {"nm.test": ["v=spf1 ip4:192.0.2.1"]}, ATTACKER_IP, "a@nm.test", "neutral"
    ),
    "none": SpfCase(
        {"none.test": ["google-site-verification=abc"]}, "192.0.2.7", "a@none.test", "none"
    ),
    "nxdomain-none": SpfCase({}, "192.0.2.7", "a@nowhere.test", "none"),
    "include-pass": SpfCase(
        {
            "inc.test": ["v=spf1 include:_spf.provider.test -all"],
            "_spf.provider.test": ["v=spf1 ip4:198.51.100.0/24 -all"],
        },
        "198.51.100.20",
        "a@inc.test",
        "pass",
    ),
    "include-no-match-then-fail": SpfCase(
        {
            "inc2.test": ["v=spf1 include:_spf.provider2.test -all"],
            "_spf.provider2.test": ["v=spf1 ip4:198.51.100.0/24 -all"],
        },
        ATTACKER_IP,
        "a@inc2.test",
        "fail",
    ),
    "include-without-record": SpfCase(
        {"inc3.test": ["v=spf1 include:empty.test -all"]}, "192.0.2.7", "a@inc3.test", "permerror"
    ),
    "redirect": SpfCase(
        {
            "red.test": ["v=spf1 redirect=_spf.red-target.test"],
            "_spf.red-target.test": ["v=spf1 ip4:192.0.2.0/24 ~all"],
        },
        ATTACKER_IP,
        "a@red.test",
        "softfail",
    ),
    "redirect-ignored-with-all": SpfCase(
        {
            "red2.test": ["v=spf1 -all redirect=_spf.red2-target.test"],
            "_spf.red2-target.test": ["v=spf1 +all"],
        },
        ATTACKER_IP,
        "a@red2.test",
        "fail",
    ),
    "a-and-mx-with-cidr": SpfCase(
        {"amx.test": ["v=spf1 a mx/24 -all"]},
        "198.51.100.77",
        "a@amx.test",
        "pass",
        a={"amx.test": ["192.0.2.1"], "mail.amx.test": ["198.51.100.10"]},
        mx={"amx.test": ["mail.amx.test"]},
    ),
    "ip6": SpfCase(
        {"six.test": ["v=spf1 ip6:2001:db8::/32 -all"]}, "2001:db8::5", "a@six.test", "pass"
    ),
    "aaaa-for-ipv6-client": SpfCase(
        {"six-a.test": ["v=spf1 a:host.six-a.test -all"]},
        "2001:db8::9",
        "a@six-a.test",
        "pass",
        aaaa={"host.six-a.test": ["2001:db8::9"]},
    ),
    "ipv4-mapped-client": SpfCase(
        {"map.test": ["v=spf1 ip4:192.0.2.7 -all"]}, "::ffff:192.0.2.7", "a@map.test", "pass"
    ),
    "exists-with-macros": SpfCase(
        {"ex.test": ["v=spf1 exists:%{i}._ip.%{d} -all"]},
        "192.0.2.9",
        "a@ex.test",
        "pass",
        a={"192.0.2.9._ip.ex.test": ["127.0.0.2"]},
    ),
    "macro-reversed-ip": SpfCase(
        {"mail.mac.test": ["v=spf1 exists:%{ir}.%{v}._spf.%{d} -all"]},
        "192.0.2.7",
        "alice@mail.mac.test",
        "pass",
        a={"7.2.0.192.in-addr._spf.mail.mac.test": ["127.0.0.2"]},
    ),
    "macro-local-part": SpfCase(
        {"mail.mac2.test": ["v=spf1 exists:%{l}.users.%{d2} -all"]},
        "192.0.2.7",
        "alice@mail.mac2.test",
        "pass",
        a={"alice.users.mac2.test": ["127.0.0.2"]},
    ),
    "ptr-without-reverse-dns": SpfCase(
        {"ptr.test": ["v=spf1 ptr -all"]}, "192.0.2.7", "a@ptr.test", "fail"
    ),
    "redirect-without-record": SpfCase(
        {"red3.test": ["v=spf1 redirect=nothing.test"]}, "192.0.2.7", "a@red3.test", "permerror"
    ),
    "helo-for-null-sender": SpfCase(
        {"helo.test": ["v=spf1 ip4:192.0.2.7 -all"]}, "192.0.2.7", "<>", "pass", helo="helo.test"
    ),
    "include-loop": SpfCase(
        {
            "loop-a.test": ["v=spf1 include:loop-b.test -all"],
            "loop-b.test": ["v=spf1 include:loop-a.test -all"],
        },
        "192.0.2.7",
        "a@loop-a.test",
        "permerror",
    ),
    "more-than-10-lookups": SpfCase(
        {**_CHAIN, "l12.chain.test": ["v=spf1 +all"]}, "192.0.2.7", "a@l0.chain.test", "permerror"
    ),
    "void-lookup-limit": SpfCase(
        {"void.test": ["v=spf1 a:nx1.void.test a:nx2.void.test a:nx3.void.test +all"]},
        "192.0.2.7",
        "a@void.test",
        "permerror",
    ),
    "two-records": SpfCase(
        {"two.test": ["v=spf1 -all", "v=spf1 +all"]}, "192.0.2.7", "a@two.test", "permerror"
    ),
    "syntax-error": SpfCase(
        {"syn.test": ["v=spf1 ip4:192.0.2.300 -all"]}, "192.0.2.7", "a@syn.test", "permerror"
    ),
    "unknown-mechanism": SpfCase(
        {"unk.test": ["v=spf1 +all foo:bar"]}, "192.0.2.7", "a@unk.test", "permerror"
    ),
}


def _publish(server: DnsServer, case: SpfCase) -> None:
    for name, texts in case.records.items():
        server.txt(name, *texts)
    for name, addresses in case.a.items():
        server.a(name, *addresses)
    for name, addresses in case.aaaa.items():
        server.aaaa(name, *addresses)
    for name, exchanges in case.mx.items():
        server.mx(name, *exchanges)


def _pyspf(server: DnsServer, case: SpfCase, monkeypatch: pytest.MonkeyPatch) -> str:
    """pyspf's answer for the same case, resolving through the same test server."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", server.port)]
    monkeypatch.setattr(dns.resolver, "default_resolver", resolver)
    sender = case.mail_from.strip("<>") or f"postmaster@{case.helo}"
    return pyspf.query(i=case.ip, s=sender, h=case.helo, timeout=2).check()[0]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", list(SPF_CASES))
async def test_spf(server: DnsServer, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    case = SPF_CASES[name]
    _publish(server, case)
    result = await check_spf(
        Resolver(["127.0.0.1"], server.port, 2.0),
        ip=case.ip,
        mail_from=case.mail_from,
        helo=case.helo,
    )
    assert result.result == case.expected
    # The reference implementation, asked against the same records, agrees.
    assert await asyncio.to_thread(_pyspf, server, case, monkeypatch) == case.expected


async def test_spf_queries_really_go_to_the_configured_server(server: DnsServer) -> None:
    server.txt("asked.test", "v=spf1 mx -all")
    server.mx("asked.test", "mx.asked.test")
    server.a("mx.asked.test", "192.0.2.25")
    result = await check_spf(
        Resolver(["127.0.0.1"], server.port, 2.0),
        ip="192.0.2.25",
        mail_from="x@asked.test",
        helo="h.test",
    )
    assert (result.result, result.domain) == ("pass", "asked.test")
    assert server.asked("asked.test", "TXT")
    assert server.asked("asked.test", "MX")
    assert server.asked("mx.asked.test", "A")


async def test_spf_temperror_on_servfail(server: DnsServer) -> None:
    server.servfail("broken.test")
    result = await check_spf(
        Resolver(["127.0.0.1"], server.port, 2.0),
        ip="192.0.2.1",
        mail_from="a@broken.test",
        helo="h.test",
    )
    assert result.result == "temperror"


async def test_resolver_distinguishes_empty_from_unanswered(server: DnsServer) -> None:
    long_text = "v=spf1 " + " ".join(f"ip4:192.0.2.{i}" for i in range(40)) + " -all"
    server.txt("long.test", long_text)  # > 255 bytes: several character-strings, and TCP
    server.txt("x._domainkey.sub.long.test", "k=rsa")
    server.servfail("fail.long.test")
    resolver = Resolver(["127.0.0.1"], server.port, 2.0)
    assert await resolver.txt("long.test") == [long_text]
    assert await resolver.txt("nothing.long.test") == []  # NXDOMAIN
    assert await resolver.a("long.test") == []  # the name exists, but has no A record
    assert await resolver.txt("_domainkey.sub.long.test") == []  # an empty non-terminal
    with pytest.raises(DnsTempError):
        await resolver.txt("fail.long.test")
    assert server.asked("long.test", "TXT")


# DKIM ---------------------------------------------------------------------------------------


async def test_dkim_signed_mail_passes_and_aligns(server: DnsServer, key: Key) -> None:
    server.txt("sel._domainkey.signed.test", key.record)
    server.txt("_dmarc.signed.test", "v=DMARC1; p=reject")
    raw = sign(message("Bob <bob@signed.test>"), key, "signed.test")
    verdict = await authenticator(server).check(
        raw, mail_from="bounce@elsewhere.test", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (verdict.dkim, verdict.dkim_domains) == ("pass", ["signed.test"])
    assert (verdict.dmarc, verdict.dmarc_policy) == ("pass", "reject")
    assert verdict.authenticated and not verdict.should_reject
    assert verdict.marker("bob@signed.test") is None
    assert verdict.spf == "none" and verdict.source == "checked"


async def test_dkim_tampered_body_fails(server: DnsServer, key: Key) -> None:
    server.txt("sel._domainkey.tamper.test", key.record)
    raw = sign(message("bob@tamper.test"), key, "tamper.test")
    raw = raw.replace(b"see you soon", b"send me money")
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip="192.0.2.1", helo="h.test"
    )
    assert (verdict.dkim, verdict.dkim_domains) == ("fail", [])
    assert not verdict.authenticated


async def test_dkim_wrong_selector_is_permerror(server: DnsServer, key: Key) -> None:
    server.txt("right._domainkey.selector.test", key.record)
    raw = sign(message("bob@selector.test"), key, "selector.test", selector="wrong")
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip="192.0.2.1", helo="h.test"
    )
    assert verdict.dkim == "permerror"
    assert server.asked("wrong._domainkey.selector.test", "TXT")


async def test_dkim_garbled_key_is_permerror(server: DnsServer, key: Key) -> None:
    server.txt("sel._domainkey.garbled.test", "v=DKIM1; k=rsa; p=bm90IGEga2V5")
    raw = sign(message("bob@garbled.test"), key, "garbled.test")
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip="192.0.2.1", helo="h.test"
    )
    assert verdict.dkim == "permerror"


async def test_dkim_any_valid_signature_passes(server: DnsServer, key: Key) -> None:
    """A list re-signs what it forwards; the author's broken signature does not spoil that."""
    server.txt("sel._domainkey.author.test", key.record)
    server.txt("list._domainkey.lists.test", key.record)
    original = sign(message("bob@author.test"), key, "author.test")
    forwarded = original.replace(b"Subject: Lunch", b"Subject: [club] Lunch")
    raw = sign(forwarded, key, "lists.test", selector="list")
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip="192.0.2.1", helo="h.test"
    )
    assert (verdict.dkim, verdict.dkim_domains) == ("pass", ["lists.test"])
    assert verdict.dmarc == "none"  # author.test publishes no policy


# DMARC --------------------------------------------------------------------------------------


async def test_dmarc_spoofed_from_of_reject_domain(server: DnsServer) -> None:
    server.txt("_dmarc.bank.test", "v=DMARC1; p=reject; rua=mailto:d@bank.test")
    server.txt("attacker.test", f"v=spf1 ip4:{ATTACKER_IP} -all")
    verdict = await authenticator(server).check(
        message("Bank <security@bank.test>"),
        mail_from="x@attacker.test",
        peer_ip=ATTACKER_IP,
        helo="attacker.test",
    )
    assert (verdict.spf, verdict.spf_domain) == ("pass", "attacker.test")
    assert verdict.dkim == "none"
    assert (verdict.from_domain, verdict.dmarc, verdict.dmarc_policy) == (
        "bank.test",
        "fail",
        "reject",
    )
    assert verdict.should_reject
    assert "DMARC: fail" in (verdict.marker("security@bank.test") or "")


async def test_dmarc_failure_under_p_none_is_marked_not_rejected(server: DnsServer) -> None:
    server.txt("_dmarc.relaxed.test", "v=DMARC1; p=none")
    verdict = await authenticator(server).check(
        message("Carol <carol@relaxed.test>"),
        mail_from="",
        peer_ip=ATTACKER_IP,
        helo="h.test",
    )
    assert (verdict.dmarc, verdict.dmarc_policy) == ("fail", "none")
    assert not verdict.should_reject and not verdict.authenticated
    assert verdict.marker("carol@relaxed.test") == (
        "⚠ could not verify that this came from carol@relaxed.test (DMARC: fail)"
    )


async def test_dmarc_spf_alignment_relaxed_and_strict(server: DnsServer) -> None:
    server.txt("bounces.shop.test", "v=SPF1 ip4:192.0.2.44 -all")
    server.txt("_dmarc.shop.test", "v=DMARC1; p=quarantine")
    server.txt("_dmarc.strict-shop.test", "v=DMARC1; p=reject; aspf=s")
    server.txt("bounces.strict-shop.test", "v=spf1 ip4:192.0.2.44 -all")
    auth = authenticator(server)
    relaxed = await auth.check(
        message("s@shop.test"), mail_from="b@bounces.shop.test", peer_ip="192.0.2.44", helo="h.test"
    )
    assert (relaxed.spf, relaxed.dmarc, relaxed.dmarc_policy) == ("pass", "pass", "quarantine")
    strict = await auth.check(
        message("s@strict-shop.test"),
        mail_from="b@bounces.strict-shop.test",
        peer_ip="192.0.2.44",
        helo="h.test",
    )
    assert (strict.spf, strict.dmarc) == ("pass", "fail")
    assert strict.should_reject


async def test_dmarc_dkim_of_another_domain_does_not_align(server: DnsServer, key: Key) -> None:
    server.txt("sel._domainkey.mailer.test", key.record)
    server.txt("_dmarc.brand.test", "v=DMARC1; p=reject")
    raw = sign(message("news@brand.test"), key, "mailer.test")
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (verdict.dkim, verdict.dkim_domains) == ("pass", ["mailer.test"])
    assert (verdict.dmarc, verdict.should_reject) == ("fail", True)


async def test_dmarc_subdomain_uses_sp_from_organizational_domain(server: DnsServer) -> None:
    server.txt("_dmarc.corp.test", "v=DMARC1; p=reject; sp=quarantine")
    auth = authenticator(server)
    sub = await auth.check(
        message("a@news.corp.test"), mail_from="", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (sub.from_domain, sub.dmarc, sub.dmarc_policy) == (
        "news.corp.test",
        "fail",
        "quarantine",
    )
    assert not sub.should_reject
    assert server.asked("_dmarc.news.corp.test", "TXT")  # asked first, then the fallback
    assert server.asked("_dmarc.corp.test", "TXT")
    top = await auth.check(message("a@corp.test"), mail_from="", peer_ip=ATTACKER_IP, helo="h.test")
    assert (top.dmarc, top.dmarc_policy, top.should_reject) == ("fail", "reject", True)


async def test_dmarc_organizational_fallback_without_sp(server: DnsServer, key: Key) -> None:
    server.txt("_dmarc.org-fallback.test", "v=DMARC1; p=reject; adkim=r")
    server.txt("sel._domainkey.org-fallback.test", key.record)
    auth = authenticator(server)
    # Signed by the organizational domain, From a subdomain: relaxed alignment passes.
    raw = sign(message("x@deep.mail.org-fallback.test"), key, "org-fallback.test")
    signed = await auth.check(raw, mail_from="", peer_ip=ATTACKER_IP, helo="h.test")
    assert (signed.dmarc, signed.dmarc_policy) == ("pass", "reject")
    spoofed = await auth.check(
        message("x@deep.mail.org-fallback.test"), mail_from="", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (spoofed.dmarc, spoofed.dmarc_policy, spoofed.should_reject) == ("fail", "reject", True)


async def test_dmarc_subdomain_record_of_its_own(server: DnsServer) -> None:
    server.txt("_dmarc.own.test", "v=DMARC1; p=reject; sp=reject")
    server.txt("_dmarc.lab.own.test", "v=DMARC1; p=none")
    verdict = await authenticator(server).check(
        message("a@lab.own.test"), mail_from="", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (verdict.dmarc, verdict.dmarc_policy) == ("fail", "none")
    assert not server.asked("_dmarc.own.test")


async def test_dmarc_strict_dkim_and_pct(server: DnsServer, key: Key) -> None:
    server.txt("_dmarc.pct.test", "v=DMARC1; p=reject; adkim=s; pct=50")
    server.txt("sel._domainkey.pct.test", key.record)
    raw = sign(message("a@www.pct.test"), key, "pct.test")
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip=ATTACKER_IP, helo="h.test"
    )
    # Strict: pct.test does not align with www.pct.test. pct=50: reject softens to quarantine.
    assert (verdict.dkim, verdict.dmarc, verdict.dmarc_policy) == ("pass", "fail", "quarantine")
    assert not verdict.should_reject


async def test_dmarc_none_without_record_marks_spf(server: DnsServer) -> None:
    server.txt("plain.test", "v=spf1 ip4:192.0.2.1 ~all")
    verdict = await authenticator(server).check(
        message("d@plain.test"), mail_from="d@plain.test", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (verdict.spf, verdict.dkim, verdict.dmarc, verdict.dmarc_policy) == (
        "softfail",
        "none",
        "none",
        None,
    )
    assert verdict.marker("d@plain.test") == (
        "⚠ could not verify that this came from d@plain.test (DMARC: none, SPF: softfail)"
    )


@pytest.mark.parametrize(
    "headers",
    [
        ("From: a@multi.test, b@multi.test",),
        ("From: a@multi.test", "From: b@other.test"),
        ("From: undisclosed-recipients:;",),
        ("From: no-domain",),
        (),
    ],
    ids=["two-addresses", "two-fields", "group", "no-domain", "no-from"],
)
async def test_dmarc_needs_exactly_one_author(server: DnsServer, headers: tuple[str]) -> None:
    server.txt("_dmarc.multi.test", "v=DMARC1; p=reject")
    raw = ("\r\n".join([*headers, "Subject: x"]) + "\r\n\r\nbody\r\n").encode()
    verdict = await authenticator(server).check(
        raw, mail_from="", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (verdict.from_domain, verdict.dmarc, verdict.should_reject) == (None, "permerror", False)
    assert not server.asked("_dmarc.multi.test")


# Timeouts and failures ----------------------------------------------------------------------


async def test_silent_dns_gives_temperror_quickly(server: DnsServer, key: Key) -> None:
    server.silent = True
    timeout = 0.3
    raw = sign(message("bob@quiet.test"), key, "quiet.test")
    started = time.monotonic()
    verdict = await authenticator(server, timeout=timeout).check(
        raw, mail_from="bob@quiet.test", peer_ip="192.0.2.1", helo="h.test"
    )
    elapsed = time.monotonic() - started
    assert elapsed < 3 * timeout, elapsed
    assert (verdict.spf, verdict.dkim, verdict.dmarc) == ("temperror",) * 3
    assert not verdict.should_reject and not verdict.authenticated
    assert verdict.marker("bob@quiet.test") == (
        "⚠ could not verify that this came from bob@quiet.test (no DNS answer)"
    )
    assert server.asked("_dmarc.quiet.test") and server.asked("sel._domainkey.quiet.test")


async def test_unexpected_input_never_raises(server: DnsServer) -> None:
    auth = authenticator(server, timeout=0.5)
    for raw in (b"", b"\x00\xff\xfe garbage without headers", b"DKIM-Signature: v=1; d=\r\n\r\n"):
        verdict = await auth.check(raw, mail_from="<>", peer_ip="not an ip", helo="")
        assert verdict.dmarc == "permerror" and not verdict.should_reject


async def test_unexpected_error_is_logged_and_unverified(
    server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    auth = authenticator(server)
    auth.resolver = None  # type: ignore[assignment]  # breaks every lookup from the inside
    server.txt("_dmarc.bug.test", "v=DMARC1; p=reject")
    with caplog.at_level(logging.ERROR, logger="bridge.email.auth"):
        verdict = await auth.check(
            message("a@bug.test"), mail_from="a@bug.test", peer_ip="192.0.2.1", helo="h.test"
        )
    assert (verdict.spf, verdict.dmarc, verdict.should_reject) == ("temperror", "temperror", False)
    assert any(r.name == "bridge.email.auth" and r.exc_info for r in caplog.records)


# Trusted Authentication-Results -------------------------------------------------------------


TRUSTED = "mx.bridge.test"


async def test_trusted_header_is_believed_without_dns(server: DnsServer) -> None:
    header = (
        f"Authentication-Results: {TRUSTED} 1;\r\n"
        "\tspf=pass (sender SPF authorized) smtp.mailfrom=bounce@trusty.test;\r\n"
        "\tdkim=fail header.d=other.test; dkim=pass header.d=trusty.test header.s=s1;\r\n"
        "\tdmarc=pass (p=REJECT sp=NONE dis=NONE) header.from=trusty.test"
    )
    forged = "Authentication-Results: evil.test; dmarc=fail header.from=trusty.test"
    raw = message("t@trusty.test", extra=(header, forged))
    verdict = await authenticator(server, trusted_authserv_id=TRUSTED).check(
        raw, mail_from="bounce@trusty.test", peer_ip="127.0.0.1", helo="localhost"
    )
    assert verdict == AuthVerdict(
        from_domain="trusty.test",
        spf="pass",
        spf_domain="trusty.test",
        dkim="pass",
        dkim_domains=["trusty.test"],
        dmarc="pass",
        dmarc_policy="reject",
        source="trusted-header",
        from_address="t@trusty.test",
    )
    assert server.queries == []


async def test_trusted_header_topmost_wins_and_policy_property(server: DnsServer) -> None:
    top = (
        f"Authentication-Results: {TRUSTED.upper()}; spf=softfail smtp.mailfrom=x.test;"
        " dmarc=fail policy.dmarc=reject header.from=x.test"
    )
    older = f"Authentication-Results: {TRUSTED}; dmarc=pass header.from=x.test"
    verdict = await authenticator(server, trusted_authserv_id=TRUSTED).check(
        message("a@x.test", extra=(top, older)), mail_from="", peer_ip="127.0.0.1", helo="h"
    )
    assert (verdict.source, verdict.spf, verdict.dkim, verdict.dmarc) == (
        "trusted-header",
        "softfail",
        "none",
        "fail",
    )
    assert verdict.should_reject


async def test_header_with_another_authserv_id_is_ignored(server: DnsServer) -> None:
    server.txt("_dmarc.victim.test", "v=DMARC1; p=reject")
    forged = (
        "Authentication-Results: evil.test; spf=pass smtp.mailfrom=victim.test;"
        " dkim=pass header.d=victim.test; dmarc=pass header.from=victim.test"
    )
    verdict = await authenticator(server, trusted_authserv_id=TRUSTED).check(
        message("ceo@victim.test", extra=(forged,)),
        mail_from="",
        peer_ip=ATTACKER_IP,
        helo="h.test",
    )
    assert (verdict.source, verdict.dmarc, verdict.should_reject) == ("checked", "fail", True)
    assert server.asked("_dmarc.victim.test")


def test_authentication_results_parsing() -> None:
    # (authres reads the authserv-id as a dot-atom: a quoted one is not supported.)
    parsed = parse(
        ' mx.example.test (our MTA) 1 ; dkim/1 = pass (good (nested) sig) header.d=a.test'
        ' header.b="abc;def" ; spf=neutral reason="no \\"match\\"" smtp.helo=h.test ; none'
    )
    assert parsed is not None and parsed.authserv_id == "mx.example.test"
    dkim_result, spf_result = parsed.results
    assert (dkim_result.method, dkim_result.result) == ("dkim", "pass")
    assert dkim_result.properties == {"header.d": "a.test", "header.b": "abc;def"}
    assert dkim_result.comments == ["good (nested) sig"]
    assert (spf_result.reason, spf_result.properties) == ('no "match"', {"smtp.helo": "h.test"})
    assert parse("   ") is None
    assert parse("example.test; none").results == []


# Configuration and storage ------------------------------------------------------------------


async def test_verdict_json_round_trip(server: DnsServer, key: Key) -> None:
    server.txt("sel._domainkey.json.test", key.record)
    server.txt("_dmarc.json.test", "v=DMARC1; p=quarantine")
    raw = sign(message("j@json.test"), key, "json.test")
    verdict = await authenticator(server).check(
        raw, mail_from="j@json.test", peer_ip="192.0.2.1", helo="h.test"
    )
    stored = json.loads(json.dumps(verdict.to_json()))
    assert AuthVerdict.from_json(stored) == verdict
    assert AuthVerdict.from_json(AuthVerdict.unverified("x.test").to_json()).from_domain == "x.test"


def test_auth_config_from_config() -> None:
    text = (
        "homeserver: {address: 'http://localhost:8008', domain: localhost}\n"
        "appservice: {address: 'http://localhost:29400', as_token: a, hs_token: h}\n"
        "encryption: {pickle_key: p}\n"
        "email: {auth: {dns_servers: ['127.0.0.1', '::1'], dns_port: 5353, dns_timeout: 1,"
        " trusted_authserv_id: ' mx.example.test ', reject_dmarc_failures: false}}\n"
    )
    assert AuthConfig.from_config(Config.from_text(text)) == AuthConfig(
        dns_servers=["127.0.0.1", "::1"],
        dns_port=5353,
        dns_timeout=1.0,
        trusted_authserv_id="mx.example.test",
        reject_dmarc_failures=False,
    )
    bad = Config.from_text(text.replace("'::1'", "dns.example.test"))
    with pytest.raises(ConfigError, match="email.auth.dns_servers"):
        AuthConfig.from_config(bad)


def test_dmarc_record_parsing() -> None:
    record = DmarcRecord.parse("v=DMARC1;p=Reject; sp=none; adkim=s; pct=20; rua=mailto:a@b")
    assert record == DmarcRecord("reject", "none", adkim="s", aspf="r", pct=20)
    assert DmarcRecord.parse("v=DMARC1; p=bogus") is None  # ignored: no DMARC for the domain
    # A broken policy with a report address is taken as monitoring only.
    assert DmarcRecord.parse("v=DMARC1; p=bogus; rua=mailto:a@b") == DmarcRecord("none", None)
    assert DmarcRecord.parse("v=DMARC1; p=none; pct=250").pct == 100


async def test_own_dkim_signature_without_dmarc_record_counts_as_authenticated(
    server: DnsServer, key: Key
) -> None:
    server.txt("sel._domainkey.nodmarc.test", key.record)
    raw = sign(message("Dee <dee@nodmarc.test>"), key, "nodmarc.test")
    verdict = await authenticator(server).check(
        raw, mail_from="dee@nodmarc.test", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert (verdict.dkim, verdict.dmarc) == ("pass", "none")
    assert verdict.authenticated and verdict.marker("dee@nodmarc.test") is None
    # A signature by some other domain proves nothing about the From address.
    server.txt("sel._domainkey.signer.test", key.record)
    other = sign(message("Dee <dee@nodmarc2.test>"), key, "signer.test")
    verdict = await authenticator(server).check(
        other, mail_from="dee@nodmarc2.test", peer_ip=ATTACKER_IP, helo="h.test"
    )
    assert verdict.dkim == "pass" and not verdict.authenticated
