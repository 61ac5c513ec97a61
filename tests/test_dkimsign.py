"""Outbound DKIM: signatures that real verifiers accept, and key handling an admin can follow.

Every signature is checked three ways: by dkimpy with the key served from a DNS function, by
the bridge's own inbound verifier against the loopback DNS server, and by a small independent
RFC 6376 verifier written here. The last one exists because dkimpy quietly checks one extra
From on its own, so it cannot tell whether *we* oversigned From; most verifiers do not do that.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from dnslib import QTYPE, RR

from bridge.config import ConfigError
from bridge.email.auth import AuthConfig, Authenticator
from bridge.email.dkimsign import (
    KEY_CONFIG,
    DkimKey,
    dns_record,
    dns_record_text,
    generate_key,
    sign,
)

from .dkimkeys import make_key
from .dnsserver import DnsServer

DOMAIN = "bridge.test"
SELECTOR = "cloak1"
PEER_IP = "192.0.2.25"  # no SPF anywhere: DKIM alone decides
NO_ENCRYPTION = serialization.NoEncryption()


@pytest.fixture(scope="session")
def rsa_pem() -> bytes:
    return make_key().private_pem  # PKCS#1, as tests/dkimkeys.py makes it


@pytest.fixture(scope="session")
def ed25519_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NO_ENCRYPTION
    )


@pytest.fixture(params=["rsa", "ed25519"])
def key(request: pytest.FixtureRequest, rsa_pem: bytes, ed25519_pem: bytes) -> DkimKey:
    pem = rsa_pem if request.param == "rsa" else ed25519_pem
    return DkimKey(SELECTOR, DOMAIN, pem)


@pytest.fixture
def rsa_key(rsa_pem: bytes) -> DkimKey:
    return DkimKey(SELECTOR, DOMAIN, rsa_pem)


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as dns_server:
        yield dns_server


def message(newline: str = "\r\n", body: str = "Hi Bob,\r\n\r\nsee you  at noon.\r\n") -> bytes:
    headers = [
        "Received: from hub.bridge.test by mx.bridge.test; Mon, 01 Jan 2024 12:00:01 +0000",
        "From: Alice via Cloakroom <alice@bridge.test>",
        "To: Bob <bob@example.test>",
        "Cc: carol@example.test",
        "Subject: Re: Lunch",
        "Date: Mon, 01 Jan 2024 12:00:00 +0000",
        "Message-ID: <reply-1@bridge.test>",
        "In-Reply-To: <lunch-1@example.test>",
        "References: <lunch-0@example.test>\r\n <lunch-1@example.test>",
        "MIME-Version: 1.0",
        'Content-Type: text/plain; charset="utf-8"',
    ]
    text = "\r\n".join(headers) + "\r\n\r\n" + body
    return text.replace("\r\n", newline).encode()


def dnsfunc(key: DkimKey, record: str | None = None) -> Callable[..., bytes | None]:
    """Serve ``record`` (by default the key's own) at the key's selector, as DNS would."""
    text = (record or dns_record(key.private_pem)).encode()

    def lookup(name: bytes, timeout: float = 5) -> bytes | None:
        return text if name == f"{key.record_name}.".encode() else None

    return lookup


def header_fields(raw: bytes) -> list[tuple[str, str]]:
    """(name, unfolded-as-is value) of every header field, top first."""
    head = re.split(rb"\r?\n\r?\n", raw, maxsplit=1)[0].decode()
    fields = [f.partition(":") for f in re.split(r"\r?\n(?![ \t])", head) if f]
    return [(name, value) for name, _, value in fields]


def tags_of(value: str) -> dict[str, str]:
    return dict(tag.split("=", 1) for tag in re.sub(r"\s+", "", value).split(";") if tag)


def signature_tags(signed: bytes) -> dict[str, str]:
    """The tags of the first DKIM-Signature, which :func:`sign` must have put on top."""
    name, value = header_fields(signed)[0]
    assert name.lower() == "dkim-signature"
    return tags_of(value)


async def our_verdict(server: DnsServer, raw: bytes) -> tuple[str, list[str]]:
    auth = Authenticator(
        AuthConfig(dns_servers=["127.0.0.1"], dns_port=server.port, dns_timeout=2.0)
    )
    verdict = await auth.check(raw, mail_from="", peer_ip=PEER_IP, helo="mx.bridge.test")
    assert server.asked(f"{SELECTOR}._domainkey.{DOMAIN}", "TXT")
    return verdict.dkim, verdict.dkim_domains


# An independent RFC 6376 verifier: relaxed/relaxed, the first signature only, no DNS. ---------


def _relaxed_header(name: str, value: str) -> bytes:
    value = re.sub(r"[ \t]+", " ", re.sub(r"\r?\n", "", value)).strip(" ")
    return f"{name.strip().lower()}:{value}".encode()


def _relaxed_body(body: bytes) -> bytes:
    lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in re.split(rb"\r?\n", body)]
    while lines and not lines[-1]:
        lines.pop()
    return b"".join(line + b"\r\n" for line in lines)


def rfc6376_verify(signed: bytes, private_pem: bytes) -> bool:
    body = re.split(rb"\r?\n\r?\n", signed, maxsplit=1)[1]
    fields = header_fields(signed)
    at = next(i for i, (name, _) in enumerate(fields) if name.lower() == "dkim-signature")
    sig_name, sig_value = fields[at]
    tags = tags_of(sig_value)
    assert tags["c"] == "relaxed/relaxed"
    if base64.b64decode(tags["bh"]) != hashlib.sha256(_relaxed_body(body)).digest():
        return False
    # Each h= entry takes the bottom-most instance not yet used; none left hashes as nothing.
    remaining = fields[:at] + fields[at + 1 :]
    hashed = b""
    for wanted in tags["h"].split(":"):
        for i in range(len(remaining) - 1, -1, -1):
            if remaining[i][0].strip().lower() == wanted.lower():
                hashed += _relaxed_header(*remaining.pop(i)) + b"\r\n"
                break
    hashed += _relaxed_header(sig_name, re.sub(r"(\bb=)[^;]*", r"\1", sig_value))
    signature = base64.b64decode(tags["b"])
    key = serialization.load_pem_private_key(private_pem, password=None)
    try:
        if isinstance(key, rsa.RSAPrivateKey):
            key.public_key().verify(signature, hashed, padding.PKCS1v15(), hashes.SHA256())
        else:
            assert isinstance(key, ed25519.Ed25519PrivateKey)
            key.public_key().verify(signature, hashlib.sha256(hashed).digest())  # RFC 8463
    except InvalidSignature:
        return False
    return True


# Signing --------------------------------------------------------------------------------------


def test_signature_verifies_with_dkimpy(key: DkimKey) -> None:
    raw = message()
    signed = sign(raw, key)
    assert signed.endswith(raw) and signed.startswith(b"DKIM-Signature:")
    assert dkim.verify(signed, dnsfunc=dnsfunc(key))
    assert rfc6376_verify(signed, key.private_pem)
    # The check is real: a key other than the signer's does not verify it.
    other = DkimKey(SELECTOR, DOMAIN, make_key().private_pem)
    assert not dkim.verify(signed, dnsfunc=dnsfunc(key, dns_record(other.private_pem)))


def test_signature_tags(key: DkimKey) -> None:
    tags = signature_tags(sign(message(), key))
    assert tags["a"] == (
        "rsa-sha256" if "k=rsa" in dns_record(key.private_pem) else "ed25519-sha256"
    )
    assert (tags["c"], tags["d"], tags["s"]) == ("relaxed/relaxed", DOMAIN, SELECTOR)
    # Every listed header present is signed, From twice; Received (added by relays) is not.
    assert tags["h"].split(":") == [
        "from",
        "from",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
    ]


def test_only_present_headers_are_signed(rsa_key: DkimKey) -> None:
    raw = b"From: alice@bridge.test\r\nSubject: hi\r\nX-Other: 1\r\n\r\nbody\r\n"
    signed = sign(raw, rsa_key)
    assert signature_tags(signed)["h"].split(":") == ["from", "from", "subject"]
    assert dkim.verify(signed, dnsfunc=dnsfunc(rsa_key))


def test_bare_lf_message_keeps_its_line_endings(rsa_key: DkimKey) -> None:
    raw = message(newline="\n")
    signed = sign(raw, rsa_key)
    assert b"\r" not in signed
    assert dkim.verify(signed, dnsfunc=dnsfunc(rsa_key))
    assert rfc6376_verify(signed, rsa_key.private_pem)


async def test_signature_passes_our_own_verifier(server: DnsServer, key: DkimKey) -> None:
    server.txt(key.record_name, dns_record(key.private_pem))
    server.txt(f"_dmarc.{DOMAIN}", "v=DMARC1; p=reject")
    assert await our_verdict(server, sign(message(), key)) == ("pass", [DOMAIN])
    # Against the same server, the unsigned message has nothing to pass with.
    auth = Authenticator(AuthConfig(dns_servers=["127.0.0.1"], dns_port=server.port))
    unsigned = await auth.check(message(), mail_from="", peer_ip=PEER_IP, helo="h.test")
    assert (unsigned.dkim, unsigned.dmarc) == ("none", "fail")


async def test_modified_body_fails(server: DnsServer, key: DkimKey) -> None:
    server.txt(key.record_name, dns_record(key.private_pem))
    signed = sign(message(), key)
    tampered = signed.replace(b"see you  at noon", b"send me  money")
    assert tampered != signed
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(key))
    assert not rfc6376_verify(tampered, key.private_pem)
    assert await our_verdict(server, tampered) == ("fail", [])


async def test_relaxed_canonicalisation_survives_whitespace_changes(
    server: DnsServer, key: DkimKey
) -> None:
    server.txt(key.record_name, dns_record(key.private_pem))
    signed = sign(message(), key)
    rewrapped = signed.replace(b"see you  at noon.", b"see you \t at noon.   ").replace(
        b"Subject: Re: Lunch", b"Subject:   Re:\r\n  Lunch"
    )
    assert dkim.verify(rewrapped, dnsfunc=dnsfunc(key))
    assert await our_verdict(server, rewrapped) == ("pass", [DOMAIN])


@pytest.mark.parametrize("where", ["top", "bottom"])
async def test_added_from_fails(server: DnsServer, key: DkimKey, where: str) -> None:
    server.txt(key.record_name, dns_record(key.private_pem))
    signed = sign(message(), key)
    forged = b"From: The CEO <ceo@bridge.test>\r\n"
    if where == "top":
        tampered = forged + signed
    else:
        head, _, body = signed.partition(b"\r\n\r\n")
        tampered = head + b"\r\n" + forged + b"\r\n" + body
    assert not rfc6376_verify(tampered, key.private_pem)
    assert not dkim.verify(tampered, dnsfunc=dnsfunc(key))
    assert await our_verdict(server, tampered) == ("fail", [])


def test_without_oversigning_an_added_from_would_pass(rsa_key: DkimKey) -> None:
    """The control for the test above: the independent verifier is what sees the difference."""
    raw = message()
    once = dkim.sign(
        raw,
        SELECTOR.encode(),
        DOMAIN.encode(),
        rsa_key.private_pem,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject"],
    )
    tampered = b"From: The CEO <ceo@bridge.test>\r\n" + once + raw
    assert rfc6376_verify(once + raw, rsa_key.private_pem)
    assert rfc6376_verify(tampered, rsa_key.private_pem)


@pytest.mark.parametrize(
    "raw",
    [
        b"To: bob@example.test\r\nSubject: no author\r\n\r\nbody\r\n",
        b"From: a@bridge.test\r\nFrom: b@bridge.test\r\nSubject: two\r\n\r\nbody\r\n",
    ],
    ids=["no-from", "two-froms"],
)
def test_sign_needs_exactly_one_from(rsa_key: DkimKey, raw: bytes) -> None:
    with pytest.raises(ValueError, match="exactly one From"):
        sign(raw, rsa_key)


# Keys -----------------------------------------------------------------------------------------


# 0o277 would leave the owner unable to read the key; the mode must be 0600 whatever the umask.
@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], ids=oct)
def test_generate_key_is_private_and_never_overwrites(tmp_path: Path, umask: int) -> None:
    path = tmp_path / "dkim.pem"
    old_umask = os.umask(umask)
    try:
        pem = generate_key(str(path), bits=1024)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == pem
    private = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(private, rsa.RSAPrivateKey) and private.key_size == 1024
    with pytest.raises(FileExistsError):
        generate_key(str(path), bits=1024)
    assert path.read_bytes() == pem
    link = tmp_path / "link.pem"
    link.symlink_to(tmp_path / "elsewhere.pem")  # a dangling symlink is still not followed
    with pytest.raises(FileExistsError):
        generate_key(str(link), bits=1024)
    assert not (tmp_path / "elsewhere.pem").exists()


def test_generated_key_loads_and_signs(tmp_path: Path) -> None:
    path = tmp_path / "dkim.pem"
    pem = generate_key(str(path))
    key = DkimKey.load(str(path), SELECTOR, "Bridge.Test.")
    assert (key.domain, key.algorithm, key.private_pem) == (DOMAIN, "rsa-sha256", pem)
    assert serialization.load_pem_private_key(pem, password=None).key_size == 2048
    assert dkim.verify(sign(message(), key), dnsfunc=dnsfunc(key))
    assert "PRIVATE" not in repr(key)


def test_pkcs8_rsa_key_is_accepted(tmp_path: Path) -> None:
    """dkimpy only reads PKCS#1; `openssl genpkey` writes PKCS#8, so that must work too."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "pkcs8.pem"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, NO_ENCRYPTION
        )
    )
    path.chmod(0o600)
    key = DkimKey.load(str(path), SELECTOR, DOMAIN)
    assert dkim.verify(sign(message(), key), dnsfunc=dnsfunc(key))


def test_loose_key_permissions_warn(
    tmp_path: Path, rsa_pem: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(rsa_pem)
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, "bridge.email.dkimsign"):
        DkimKey.load(str(path), SELECTOR, DOMAIN)
        assert not caplog.records
        path.chmod(0o644)
        DkimKey.load(str(path), SELECTOR, DOMAIN)
    assert "readable by others" in caplog.text


def _private_pem(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, password: bytes = b""
) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else NO_ENCRYPTION
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


LOAD_ERRORS = {
    "missing": (None, "does not exist"),
    "not-pem": (b"selector: cloak1\nthis is a config file\n", "not a PEM file"),
    "public-key": (
        make_key().private_pem.replace(b"PRIVATE", b"PUBLIC"),
        "no private key",
    ),
    "garbled": (
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        "not a readable private key",
    ),
    "encrypted": (
        _private_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024), b"secret"),
        "encrypted",
    ),
    "ec-key": (_private_pem(ec.generate_private_key(ec.SECP256R1())), "RSA or Ed25519"),
    "directory": (b"", "is a directory"),
}


@pytest.mark.parametrize("case", LOAD_ERRORS)
def test_load_errors_name_the_config_key(tmp_path: Path, case: str) -> None:
    content, problem = LOAD_ERRORS[case]
    path = tmp_path / "dkim.pem"
    if case == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        DkimKey.load(str(path), SELECTOR, DOMAIN)
    assert raised.value.key == KEY_CONFIG == "email.dkim.private_key"
    assert problem in raised.value.message and str(path) in raised.value.message


@pytest.mark.parametrize("selector", ["", "bad selector", "s;x=1", "s\r\nBcc: x@y"])
def test_bad_selector_is_a_config_error(tmp_path: Path, rsa_pem: bytes, selector: str) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(rsa_pem)
    with pytest.raises(ConfigError) as raised:
        DkimKey.load(str(path), selector, DOMAIN)
    assert raised.value.key == "email.dkim.selector"
    with pytest.raises(ValueError):
        DkimKey(selector, DOMAIN, rsa_pem)


def test_bad_domain_is_refused(rsa_pem: bytes) -> None:
    with pytest.raises(ValueError, match="not a domain"):
        DkimKey(SELECTOR, "bridge.test\r\nX: 1", rsa_pem)


# DNS records ----------------------------------------------------------------------------------


def test_dns_record_matches_the_public_key() -> None:
    pair = make_key()  # tests/dkimkeys.py derives the record on its own
    assert dns_record(pair.private_pem) == pair.record


def test_ed25519_dns_record_is_the_bare_key(ed25519_pem: bytes) -> None:
    record = dns_record(ed25519_pem)
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    public = serialization.load_pem_private_key(ed25519_pem, password=None).public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert base64.b64decode(record.split("p=", 1)[1]) == raw


def _quoted_strings(text: str) -> list[str]:
    inner = re.fullmatch(r'[^"(]*\(\s*((?:"[^"]*"\s*)+)\)', text)
    assert inner, text
    return re.findall(r'"([^"]*)"', inner.group(1))


@pytest.mark.parametrize("p_length", [0, 10, 237, 238, 392, 736, 1500])
def test_dns_record_text_chunks(p_length: int) -> None:
    record = "v=DKIM1; k=rsa; p=" + ("AB+/" * 400)[:p_length]
    text = dns_record_text(SELECTOR, DOMAIN, record)
    assert text.startswith(f'{SELECTOR}._domainkey.{DOMAIN}. IN TXT ( "v=DKIM1; k=rsa; " "p=')
    pieces = _quoted_strings(text)
    assert all(len(piece) <= 255 for piece in pieces)
    assert "".join(pieces) == record
    # A zone-file parser reads it back to the same strings.
    (rr,) = RR.fromZone(text)
    assert (str(rr.rname), QTYPE[rr.rtype]) == (f"{SELECTOR}._domainkey.{DOMAIN}.", "TXT")
    assert b"".join(rr.rdata.data) == record.encode()


async def test_published_record_text_serves_a_working_key(
    server: DnsServer, rsa_key: DkimKey
) -> None:
    """What the admin pastes, loaded into a DNS server, lets mail signed with the key pass."""
    text = dns_record_text(SELECTOR, DOMAIN, dns_record(rsa_key.private_pem))
    (rr,) = RR.fromZone(text)
    server.txt(str(rr.rname).rstrip("."), b"".join(rr.rdata.data).decode())
    assert await our_verdict(server, sign(message(), rsa_key)) == ("pass", [DOMAIN])
