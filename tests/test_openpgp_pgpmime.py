"""bridge.email.openpgp.pgpmime (RFC 3156 with protected headers) and vcard, rpgp on both
ends; the GnuPG peer is in test_openpgp_gnupg.py."""

from __future__ import annotations

import email.policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
from openpgp.composed import Message, MessageBuilder

from bridge.email.openpgp import autocrypt, keys, vcard
from bridge.email.openpgp.keys import (
    DecryptionError,
    PublicKey,
    SecretKey,
    SignatureStatus,
    TooLargeError,
    sign_detached,
)
from bridge.email.openpgp.pgpmime import (
    KeySource,
    MailFormatError,
    MailKind,
    encrypt_mail,
    merged_mail,
    open_mail,
    signed_parts,
)

ALICE, BOB, CAROL = "alice@example.org", "bob@example.net", "carol@example.com"
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def alice() -> SecretKey:
    return SecretKey.generate(ALICE)


@pytest.fixture(scope="module")
def bob() -> SecretKey:
    return SecretKey.generate(BOB)


@pytest.fixture(scope="module")
def carol() -> SecretKey:
    return SecretKey.generate(CAROL)


def mail(to: str = BOB, **extra: str) -> EmailMessage:
    message = EmailMessage(policy=email.policy.SMTP)
    message["From"] = f"Alice <{ALICE}>"
    message["To"] = to
    message["Subject"] = "Quarterly numbers"
    message["Date"] = "Fri, 04 Dec 2026 18:00:00 +0000"
    message["Message-ID"] = "<id1@example.org>"
    message["In-Reply-To"] = "<id0@example.net>"
    for name, text in extra.items():
        message[name.replace("_", "-")] = text
    message.set_content("The numbers are up.\n")
    message.add_attachment(b"\x00\x01binary", maintype="application", subtype="octet-stream")
    return message


def parse(raw: bytes) -> EmailMessage:
    return BytesParser(policy=email.policy.default).parsebytes(raw)


# --- compose ---------------------------------------------------------------------------------


def test_outer_is_rfc3156_and_leaks_only_transport(alice, bob) -> None:
    raw = encrypt_mail(
        mail(X_Secret_Project="apollo", Bcc="hidden@example.org"),
        sender=alice,
        recipients={BOB: bob.public_key, "hidden@example.org": alice.public_key},
    )
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF throughout
    outer = parse(raw)
    assert outer.get_content_type() == "multipart/encrypted"
    assert outer.get_param("protocol") == "application/pgp-encrypted"
    control, data = outer.get_payload()
    assert control.get_content_type() == "application/pgp-encrypted"
    assert control.get_payload().strip() == "Version: 1"
    assert data.get_content_type() == "application/octet-stream"
    assert data.get_payload().startswith("-----BEGIN PGP MESSAGE-----")
    assert outer["Subject"] == "[...]"
    names = {name.lower() for name in outer.keys()}
    assert names == {
        "from", "to", "date", "message-id", "in-reply-to", "subject", "mime-version",
        "content-type", "autocrypt",
    }  # fmt: skip
    for secret in (b"Quarterly", b"apollo", b"hidden@example.org", b"numbers are up"):
        assert secret not in raw


def test_inner_part_carries_the_protected_headers(alice, bob) -> None:
    raw = encrypt_mail(
        mail(X_Secret_Project="apollo", Bcc="hidden@example.org"),
        sender=alice,
        recipients={BOB: bob.public_key},
        chat_version=True,
    )
    opened = open_mail(raw, bob, peer_keys=[alice.public_key])
    inner = parse(opened.content)
    assert inner.get_content_type() == "multipart/mixed"
    assert inner.get_param("protected-headers") == "v1" and opened.protected
    assert inner["Subject"] == "Quarterly numbers"
    assert (inner["From"], inner["To"]) == (f"Alice <{ALICE}>", BOB)
    assert inner["Message-ID"] == "<id1@example.org>" and inner["X-Secret-Project"] == "apollo"
    assert inner["Chat-Version"] == "1.0"
    assert inner["Bcc"] is None  # blind recipients are never shown to the others
    [own] = inner.get_all("Autocrypt")
    assert autocrypt.parse_header(str(own)).key.fingerprint == alice.fingerprint
    assert inner.get_all("Autocrypt-Gossip") is None  # one recipient: nothing to gossip
    attachment = [p for p in inner.iter_attachments()][0]
    assert attachment.get_content() == b"\x00\x01binary"
    assert ("Subject", "Quarterly numbers") in opened.protected_headers
    assert opened.autocrypt == (str(own),)


def test_group_mail_gossips_every_to_and_cc_but_not_bcc(alice, bob, carol) -> None:
    hidden = SecretKey.generate("hidden@example.org")
    raw = encrypt_mail(
        mail(to=f"{BOB}, Alice <{ALICE}>", Cc=f"Carol <{CAROL}>"),
        sender=alice,
        recipients={
            BOB: bob.public_key,
            CAROL: carol.public_key,
            "hidden@example.org": hidden.public_key,
        },
    )
    for reader in (alice, bob, carol, hidden):  # every recipient and the sender read it
        assert open_mail(raw, reader).verification.status is SignatureStatus.GOOD
    opened = open_mail(raw, bob)
    armored = parse(raw).get_payload()[1].get_payload()
    pkesks = Message.from_armor(armored)[0].public_key_encrypted_session_key_packets()
    assert len(pkesks) == 4 and all(p.recipient_is_anonymous for p in pkesks)  # Bcc: hidden
    gossip = {autocrypt.parse_header(g, gossip=True).addr: g for g in opened.gossip}
    assert set(gossip) == {BOB, CAROL}  # the sender has its own header; Bcc stays hidden
    key = autocrypt.parse_header(gossip[CAROL], gossip=True).key
    assert key.fingerprint == carol.fingerprint


def test_gossip_feeds_the_level1_rules(alice, bob, carol) -> None:
    raw = encrypt_mail(
        mail(to=f"{BOB}, {CAROL}"),
        sender=alice,
        recipients={BOB: bob.public_key, CAROL: carol.public_key},
    )
    opened = open_mail(raw, bob)
    good = opened.verification.status is SignatureStatus.GOOD
    facts = autocrypt.mail_facts(parse(raw), opened.inner_headers(), gossip_allowed=good)
    sender = autocrypt.update_peer(None, facts, NOW)
    assert PublicKey.from_bytes(sender.public_key) == alice.public_key.minimal(ALICE)
    assert sender.prefer_encrypt == autocrypt.MUTUAL
    changed = autocrypt.update_gossip({}, facts, NOW)
    assert set(changed) == {BOB, CAROL}
    assert PublicKey.from_bytes(changed[CAROL].gossip_key).fingerprint == carol.fingerprint


def test_key_ids_are_visible_without_bcc(alice, bob) -> None:
    raw = encrypt_mail(mail(), sender=alice, recipients={BOB: bob.public_key})
    armored = parse(raw).get_payload()[1].get_payload()
    pkesks = Message.from_armor(armored)[0].public_key_encrypted_session_key_packets()
    assert len(pkesks) == 2 and not any(p.recipient_is_anonymous for p in pkesks)


def test_every_visible_recipient_needs_a_key(alice, bob) -> None:
    with pytest.raises(ValueError, match="no key"):
        encrypt_mail(mail(to=f"{BOB}, {CAROL}"), sender=alice, recipients={BOB: bob.public_key})


def test_bytes_in_and_no_outer_autocrypt_on_request(alice, bob) -> None:
    raw_in = mail().as_bytes()
    raw = encrypt_mail(
        raw_in, sender=alice, recipients={BOB: bob.public_key}, outer_autocrypt=False
    )
    assert parse(raw)["Autocrypt"] is None
    assert open_mail(raw, bob).autocrypt  # still inside


def test_sender_must_be_one_address(alice, bob) -> None:
    message = mail()
    message.replace_header("From", f"{ALICE}, {BOB}")
    with pytest.raises(ValueError, match="From"):
        encrypt_mail(message, sender=alice, recipients={BOB: bob.public_key})


def test_long_headers_pass_through_unfolded_by_us(alice, bob) -> None:
    refs = " ".join(f"<{i}.very-long-message-id-for-threading@example.net>" for i in range(8))
    raw = encrypt_mail(mail(References=refs), sender=alice, recipients={BOB: bob.public_key})
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0]  # no encoded-words in the outer header
    assert parse(raw)["References"].split() == refs.split()
    assert parse(open_mail(raw, bob).content)["References"].split() == refs.split()


# --- open ------------------------------------------------------------------------------------


def test_key_source_says_which_key_verified(alice, bob) -> None:
    raw = encrypt_mail(mail(), sender=alice, recipients={BOB: bob.public_key})
    assert open_mail(raw, bob, peer_keys=[alice.public_key]).key_source is KeySource.PEER
    first = open_mail(raw, bob)  # a first mail: verified by the key it carries
    assert first.verification.status is SignatureStatus.GOOD
    assert first.key_source is KeySource.AUTOCRYPT_HEADER


def test_autocrypt_key_of_another_address_does_not_verify(alice, bob, carol) -> None:
    """Mallory's mail (From: carol) carrying Alice's header must not verify by it."""
    header = "".join(autocrypt.build_header(ALICE, alice.public_key).lines)
    inner = (
        f"From: {CAROL}\r\nAutocrypt: {header}\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
    ).encode()
    armored = keys.encrypt(inner, signer=alice, recipients=[bob.public_key])
    raw = pgp_mime(armored, sender=CAROL)
    opened = open_mail(raw, bob)
    assert opened.autocrypt  # the header is there...
    assert opened.verification.status is SignatureStatus.UNKNOWN_SIGNER  # ...but not for From


def test_merged_mail_is_the_real_mail_with_the_authenticated_from(alice, bob) -> None:
    raw = encrypt_mail(mail(), sender=alice, recipients={BOB: bob.public_key})
    received = b"Received: from relay by mx; Fri, 04 Dec 2026 18:00:01 +0000\r\n" + raw
    opened = open_mail(received, bob)
    merged = parse(merged_mail(received, opened))
    assert merged["Subject"] == "Quarterly numbers"
    assert merged["From"] == f"Alice <{ALICE}>"
    assert merged["Received"].startswith("from relay")
    assert len(merged.get_all("Subject")) == 1 and len(merged.get_all("From")) == 1
    assert merged.get_content_type() == "multipart/mixed"
    assert merged.get_body(("plain",)).get_content().rstrip() == "The numbers are up."


def test_merged_mail_keeps_the_outer_from_over_a_different_inner_one(alice, bob) -> None:
    message = mail()
    message.replace_header("From", "ceo@example.org")  # inner From claims someone else
    armored = keys.encrypt(message.as_bytes(), signer=alice, recipients=[bob.public_key])
    raw = pgp_mime(armored, sender=ALICE)
    merged = parse(merged_mail(raw, open_mail(raw, bob)))
    assert merged.get_all("From") == [ALICE]


def pgp_mime(armored: str, *, sender: str = ALICE, version: str = "Version: 1", parts=2) -> bytes:
    body = (
        f"--b\r\nContent-Type: application/pgp-encrypted\r\n\r\n{version}\r\n"
        f"--b\r\nContent-Type: application/octet-stream\r\n\r\n{armored}\r\n"
    )
    if parts == 1:
        body = f"--b\r\nContent-Type: application/octet-stream\r\n\r\n{armored}\r\n"
    return (
        f"From: {sender}\r\nSubject: [...]\r\nContent-Type: multipart/encrypted;"
        f' protocol="application/pgp-encrypted"; boundary="b"\r\n\r\n{body}--b--\r\n'
    ).encode()


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda raw: raw.replace(b'protocol="application/pgp-encrypted"; ', b""), MailFormatError),
        (lambda raw: raw.replace(b"Version: 1", b"Version: 2"), MailFormatError),
        (lambda raw: raw.replace(b"-----BEGIN", b"-----BEGIN-X"), DecryptionError),
    ],
)
def test_broken_pgp_mime_structure(alice, bob, mangle, error) -> None:
    armored = keys.encrypt(b"Subject: x\r\n\r\nx", signer=alice, recipients=[bob.public_key])
    with pytest.raises(error):
        open_mail(mangle(pgp_mime(armored)), bob)


def test_one_part_pgp_mime_is_a_format_error(alice, bob) -> None:
    armored = keys.encrypt(b"x", signer=alice, recipients=[bob.public_key])
    with pytest.raises(MailFormatError):
        open_mail(pgp_mime(armored, parts=1), bob)


def test_too_large_is_refused_before_parsing(bob) -> None:
    with pytest.raises(TooLargeError):
        open_mail(b"x" * 1001, bob, max_bytes=1000)


def test_plain_mail_is_plain(bob) -> None:
    raw = b"From: someone@example.net\r\nSubject: hi\r\n\r\nhello\r\n"
    opened = open_mail(raw, bob)
    assert opened.kind is MailKind.PLAIN and not opened.encrypted and opened.content == raw
    assert merged_mail(raw, opened) == raw


def test_inline_pgp_in_a_multipart_body(alice, bob) -> None:
    armored = keys.encrypt("inline text ✓\n".encode(), signer=alice, recipients=[bob.public_key])
    raw = (
        f"From: {ALICE}\r\nSubject: inline\r\nContent-Type: multipart/alternative;"
        ' boundary="a"\r\n\r\n--a\r\nContent-Type: text/plain\r\n\r\n'
        f"{armored}\r\n--a\r\nContent-Type: text/html\r\n\r\n<p>encrypted</p>\r\n--a--\r\n"
    ).encode()
    opened = open_mail(raw, bob, peer_keys=[alice.public_key])
    assert opened.kind is MailKind.INLINE and opened.encrypted
    assert parse(opened.content).get_content() == "inline text ✓\r\n"
    assert opened.verification.status is SignatureStatus.GOOD


def test_attached_mail_with_inline_pgp_is_not_decrypted(alice, bob) -> None:
    armored = keys.encrypt(b"x", signer=alice, recipients=[bob.public_key])
    raw = (
        f"From: {ALICE}\r\nContent-Type: multipart/mixed; boundary=m\r\n\r\n--m\r\n"
        "Content-Type: text/plain\r\n\r\nsee attached\r\n--m\r\nContent-Type: message/rfc822\r\n"
        f"\r\nFrom: x@example.net\r\nContent-Type: text/plain\r\n\r\n{armored}\r\n--m--\r\n"
    ).encode()
    assert open_mail(raw, bob).kind is MailKind.PLAIN


def signed_mail(alice: SecretKey, part: bytes, linesep: bytes = b"\r\n") -> bytes:
    signature = sign_detached(part.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), alice)
    raw = (
        f"From: {ALICE}\r\nSubject: signed\r\nContent-Type: multipart/signed;"
        ' micalg=pgp-sha256; protocol="application/pgp-signature"; boundary="s"\r\n\r\n'
        "This is an OpenPGP/MIME signed message.\r\n--s\r\n"
    ).encode()
    raw += part + b"\r\n--s\r\nContent-Type: application/pgp-signature\r\n\r\n"
    raw += signature.encode() + b"\r\n--s--\r\n"
    return raw.replace(b"\r\n", linesep)


PART = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nI said this.\r\n\r\n"


@pytest.mark.parametrize("linesep", [b"\r\n", b"\n"])  # a mail store may have dropped the CRs
def test_multipart_signed_good_and_bad(alice, bob, linesep: bytes) -> None:
    raw = signed_mail(alice, PART, linesep)
    opened = open_mail(raw, bob, peer_keys=[alice.public_key])
    assert opened.kind is MailKind.SIGNED and not opened.encrypted
    assert opened.verification.status is SignatureStatus.GOOD
    assert opened.content == PART  # the trailing empty line is the part's own
    tampered = raw.replace(b"I said", b"I never said")
    assert open_mail(tampered, bob, peer_keys=[alice.public_key]).verification.status is (
        SignatureStatus.BAD
    )


def test_signed_parts_cuts_the_raw_bytes() -> None:
    raw = (
        b'Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary=x\r\n'
        b"\r\npreamble\r\n--x\r\nA: b\r\n\r\nbody\r\n--x  \r\nContent-Type: application/pgp-si"
        b"gnature\r\n\r\nSIG\r\n--x--\r\nepilogue"
    )
    assert signed_parts(raw) == (b"A: b\r\n\r\nbody", b"SIG")
    with pytest.raises(MailFormatError):
        signed_parts(raw.replace(b"--x  \r\n", b"--y\r\n"))
    with pytest.raises(MailFormatError):
        signed_parts(raw.replace(b'pgp-signature"', b'pkcs7-signature"'))


def test_signed_then_encrypted_in_two_layers(alice, bob) -> None:
    """Older MUAs sign with multipart/signed and encrypt that without an OpenPGP signature."""
    inner = signed_mail(alice, PART).split(b"\r\n", 2)[2]  # drop From and Subject
    inner = b"Subject: real\r\n" + inner
    subkey = keys._encryption_subkey(bob.public_key.native)
    builder = MessageBuilder.from_bytes("", inner).seipd_v1("aes256").encrypt_to_key(subkey)
    opened = open_mail(pgp_mime(builder.to_armored_string()), bob, peer_keys=[alice.public_key])
    assert opened.kind is MailKind.PGP_MIME
    assert opened.verification.status is SignatureStatus.GOOD
    assert opened.content == PART


# --- vCard -----------------------------------------------------------------------------------


def test_vcard_in_delta_chat_form(alice: SecretKey) -> None:
    card = vcard.make_vcard(ALICE, alice.public_key, "Alice, Inc.; Ops\nTeam", updated=NOW)
    lines = card.split("\r\n")
    assert lines[:4] == [
        "BEGIN:VCARD",
        "VERSION:4.0",
        f"EMAIL:{ALICE}",
        "FN:Alice\\, Inc.\\; Ops Team",  # a line break in a name becomes a space
    ]
    key_line = lines[4]
    assert key_line.startswith("KEY:data:application/pgp-keys;base64\\,")  # the escaped comma
    assert "\r\n " not in card  # not folded
    assert lines[5:] == ["REV:20270115T080000Z", "END:VCARD", ""]
    [contact] = vcard.parse_vcard(card)
    assert (contact.address, contact.display_name) == (ALICE, "Alice, Inc.; Ops Team")
    assert PublicKey.from_bytes(contact.key) == alice.public_key.minimal(ALICE)


def test_vcard_parser_takes_both_key_spellings_and_drops_bad_keys(alice: SecretKey) -> None:
    card = vcard.make_vcard(ALICE, alice.public_key)
    unescaped = card.replace("base64\\,", "base64,")
    assert vcard.parse_vcard(unescaped)[0].key is not None
    folded = card.replace("KEY:data:", "KEY:data:\r\n ")
    assert vcard.parse_vcard(folded)[0].key is not None
    broken = card.replace(
        "KEY:data:application/pgp-keys;base64\\,", "KEY:data:application/pgp-keys;base64\\,AAAA"
    )
    [contact] = vcard.parse_vcard(broken)
    assert contact.key is None and contact.address == ALICE
    assert vcard.parse_vcard("BEGIN:VCARD\r\nFN:x\r\nEND:VCARD\r\n") == []  # no EMAIL
    with pytest.raises(ValueError):
        vcard.parse_vcard("x" * (vcard.MAX_VCARD_CHARS + 1))
