"""Interop with an independent OpenPGP implementation: GnuPG 2.2 (Debian's gpg) through
python-gnupg, one throw-away GNUPGHOME per test. gpg is only the test peer: the library never
runs it."""

from __future__ import annotations

import base64
import email.policy
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from bridge.email.openpgp import autocrypt
from bridge.email.openpgp.keys import (
    DecryptionError,
    KeyFormatError,
    PublicKey,
    SecretKey,
    SignatureStatus,
    decrypt,
    encrypt,
)
from bridge.email.openpgp.pgpmime import KeySource, MailKind, encrypt_mail, open_mail

gnupg = pytest.importorskip("gnupg", reason="python-gnupg is not installed (pip install .[test])")
pytestmark = pytest.mark.skipif(
    shutil.which("gpg") is None, reason="gpg is not installed (scripts/system-deps.sh: gnupg)"
)

ALICE = "alice@example.org"  # us: an rpgp key
BOB = "bob@example.net"  # the gpg peer


@dataclass
class Peer:
    gpg: gnupg.GPG
    home: str
    fingerprint: str  # bob's primary
    public: PublicKey  # bob's key as we parse it

    def run(self, *args: str, data: bytes) -> subprocess.CompletedProcess[bytes]:
        """gpg itself, for the odd construction python-gnupg does not expose."""
        env = dict(os.environ, GNUPGHOME=self.home)
        command = ["gpg", "--batch", "--quiet", "--trust-model", "always", *args]
        return subprocess.run(command, input=data, capture_output=True, env=env, check=True)


@pytest.fixture
def peer() -> Iterator[Peer]:
    # Short path: gpg-agent's socket lives in the home when /run/user is missing (108 bytes).
    home = tempfile.mkdtemp(prefix="gpg-")
    gpg = gnupg.GPG(gnupghome=home)
    spec = gpg.gen_key_input(
        key_type="EDDSA",
        key_curve="ed25519",
        key_usage="sign,cert",
        subkey_type="ECDH",
        subkey_curve="cv25519",
        subkey_usage="encrypt",
        name_email=BOB,
        no_protection=True,
    )
    generated = gpg.gen_key(spec)
    assert generated.fingerprint, generated.stderr
    public = PublicKey.from_armored(gpg.export_keys(generated.fingerprint))
    try:
        yield Peer(gpg, home, generated.fingerprint, public)
    finally:
        # Only the agent this test started (the one serving this home).
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"],
            env=dict(os.environ, GNUPGHOME=home),
            capture_output=True,
        )
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def alice() -> SecretKey:
    return SecretKey.generate(ALICE)


def import_ours(peer: Peer, key: PublicKey) -> None:
    result = peer.gpg.import_keys(key.to_bytes())
    assert result.imported == 1, result.stderr


# --- our key in gpg --------------------------------------------------------------------------


def test_autocrypt_keydata_imports_into_gpg_with_the_right_shape(peer: Peer, alice) -> None:
    header = autocrypt.build_header(ALICE, alice.public_key)
    keydata = base64.b64decode("".join(header.lines[1:]))
    result = peer.gpg.import_keys(keydata)
    assert result.imported == 1 and result.fingerprints == [alice.fingerprint]
    [listed] = [k for k in peer.gpg.list_keys() if k["fingerprint"] == alice.fingerprint]
    assert listed["uids"] == [ALICE]
    assert listed["algo"] == "22"  # EdDSA (legacy Ed25519, RFC 4880bis / gpg 2.2)
    assert set(listed["cap"]) >= {"s", "c"} and "e" not in listed["cap"].replace("E", "")
    [sub] = listed["subkey_info"].values()
    assert sub["algo"] == "18" and sub["cap"] == "e"  # ECDH Cv25519, encrypt only
    packets = peer.run("--list-packets", data=keydata).stdout.decode()
    assert "version 4" in packets
    assert "key flags: 03" in packets and "key flags: 04" in packets
    assert "features: 01" in packets  # SEIPDv1 only: no v2 bit, gpg 2.2 encrypts v1 to us


def test_gpg_encrypts_to_our_key_with_its_defaults(peer: Peer, alice) -> None:
    """gpg's defaults: compressed, signed with its primary, to our subkey."""
    import_ours(peer, alice.public_key)
    sent = peer.gpg.encrypt(
        b"hello alice\r\n", [alice.fingerprint], sign=peer.fingerprint, always_trust=True
    )
    assert sent.ok, sent.stderr
    got = decrypt(str(sent), alice, verify_with=[peer.public])
    assert got.plaintext == b"hello alice\r\n"
    assert got.verification.status is SignatureStatus.GOOD
    assert got.verification.key_fingerprint == peer.fingerprint
    assert decrypt(str(sent), alice).verification.status is SignatureStatus.UNKNOWN_SIGNER


# --- gpg-made PGP/MIME in --------------------------------------------------------------------


def gpg_pgp_mime(peer: Peer, recipient: str, inner: bytes, *, tamper: bool = False) -> bytes:
    """A PGP/MIME mail around gpg's encrypt+sign output (compressed, its default)."""
    if tamper:
        # Sign uncompressed, flip one byte of the signed text, then encrypt the packets as
        # they are (--no-literal): decryption succeeds, the signature must not.
        signed = bytearray(peer.run("--sign", "-z", "0", data=inner).stdout)
        where = bytes(signed).find(b"Meet")
        signed[where] ^= 0x20
        armored = peer.run("--armor", "--no-literal", "-e", "-r", recipient, data=bytes(signed))
        ciphertext = armored.stdout.decode()
    else:
        sent = peer.gpg.encrypt(inner, [recipient], sign=peer.fingerprint, always_trust=True)
        assert sent.ok, sent.stderr
        ciphertext = str(sent)
    return (
        f"From: Bob <{BOB}>\r\nTo: {ALICE}\r\nSubject: [...]\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="b1"\r\n'
        "\r\n--b1\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        '\r\n--b1\r\nContent-Type: application/octet-stream; name="encrypted.asc"\r\n\r\n'
        f"{ciphertext}\r\n--b1--\r\n"
    ).encode()


INNER = (
    b'Content-Type: text/plain; charset=utf-8; protected-headers="v1"\r\n'
    b"Subject: Meeting\r\nFrom: Bob <bob@example.net>\r\nTo: alice@example.org\r\n\r\n"
    b"Meet at noon.\r\n"
)


def test_gpg_pgp_mime_decrypts_and_verifies(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    opened = open_mail(gpg_pgp_mime(peer, alice.fingerprint, INNER), alice, peer_keys=[peer.public])
    assert opened.kind is MailKind.PGP_MIME
    assert opened.content == INNER
    assert opened.verification.status is SignatureStatus.GOOD
    assert opened.verification.key_fingerprint == peer.fingerprint
    assert opened.key_source is KeySource.PEER
    assert opened.protected and ("Subject", "Meeting") in opened.protected_headers


def test_gpg_pgp_mime_with_tampered_signature_is_bad(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    raw = gpg_pgp_mime(peer, alice.fingerprint, INNER, tamper=True)
    opened = open_mail(raw, alice, peer_keys=[peer.public])
    assert opened.verification.status is SignatureStatus.BAD
    assert b"Subject: meeting" in opened.content  # the flipped byte: decrypted, not trusted


def test_gpg_message_to_someone_else_is_a_decryption_error(peer: Peer, alice) -> None:
    raw = gpg_pgp_mime(peer, peer.fingerprint, INNER)  # to bob himself
    with pytest.raises(DecryptionError):
        open_mail(raw, alice, peer_keys=[peer.public])


@pytest.mark.parametrize(
    "garbage",
    [
        "-----BEGIN PGP MESSAGE-----\r\n\r\nAAAAAAAA\r\n-----END PGP MESSAGE-----\r\n",
        "-----BEGIN PGP MESSAGE-----\r\n\r\n" + "x" * 70 + "\r\n-----END PGP MESSAGE-----\r\n",
        "not even armor",
        "",
    ],
)
def test_garbage_ciphertext_is_a_decryption_error(alice, garbage: str) -> None:
    raw = (
        f"From: {BOB}\r\nContent-Type: multipart/encrypted;"
        ' protocol="application/pgp-encrypted"; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        f"--b\r\nContent-Type: application/octet-stream\r\n\r\n{garbage}\r\n--b--\r\n"
    ).encode()
    with pytest.raises(DecryptionError):
        open_mail(raw, alice)


def test_gpg_ciphertext_with_a_flipped_byte_is_a_decryption_error(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    binary = peer.run("-e", "-r", alice.fingerprint, "-s", data=b"x" * 500).stdout
    tampered = bytearray(binary)
    tampered[len(tampered) // 2] ^= 0x01
    with pytest.raises(DecryptionError):
        decrypt(bytes(tampered), alice, verify_with=[peer.public])


def test_gpg_inline_pgp_in_text_plain(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    sent = peer.gpg.encrypt(
        "Grüße, inline\n".encode(), [alice.fingerprint], sign=peer.fingerprint, always_trust=True
    )
    raw = (
        f"From: {BOB}\r\nTo: {ALICE}\r\nSubject: inline\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        f"{str(sent)}\r\n-- \r\nlist footer\r\n"
    ).encode()
    opened = open_mail(raw, alice, peer_keys=[peer.public])
    assert opened.kind is MailKind.INLINE
    assert "Grüße, inline".encode() in opened.content and b"list footer" in opened.content
    assert opened.verification.status is SignatureStatus.GOOD


def test_gpg_detached_signature_multipart_signed(peer: Peer, alice) -> None:
    part = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nSigned, not sealed.\r\n"
    signature = peer.gpg.sign(part, keyid=peer.fingerprint, detach=True, clearsign=False)
    assert signature.status == "signature created", signature.stderr
    raw = (
        f"From: {BOB}\r\nTo: {ALICE}\r\nSubject: signed\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/signed; micalg=pgp-sha512; protocol="application/pgp-signature";'
        ' boundary="s"\r\n\r\n--s\r\n'
    ).encode()
    tail = (
        b'\r\n--s\r\nContent-Type: application/pgp-signature; name="signature.asc"\r\n\r\n'
        + bytes(signature.data)
        + b"\r\n--s--\r\n"
    )
    opened = open_mail(raw + part + tail, alice, peer_keys=[peer.public])
    assert opened.kind is MailKind.SIGNED and opened.content == part
    assert opened.verification.status is SignatureStatus.GOOD
    tampered = raw + part.replace(b"not", b"now") + tail
    assert open_mail(tampered, alice, peer_keys=[peer.public]).verification.status is (
        SignatureStatus.BAD
    )
    assert open_mail(raw + part + tail, alice).verification.status is (
        SignatureStatus.UNKNOWN_SIGNER
    )


# --- our PGP/MIME out, read by gpg -----------------------------------------------------------


def our_mail(to: str) -> EmailMessage:
    mail = EmailMessage(policy=email.policy.SMTP)
    mail["From"] = f"Alice <{ALICE}>"
    mail["To"] = to
    mail["Subject"] = "The real subject"
    mail["Date"] = "Fri, 04 Dec 2026 18:00:00 +0000"
    mail["Message-ID"] = "<m1@example.org>"
    mail.set_content("Hello from the bridge.\n")
    return mail


def armored_part(raw: bytes) -> str:
    outer = BytesParser(policy=email.policy.default).parsebytes(raw)
    return outer.get_payload()[1].get_payload()


def test_our_pgp_mime_decrypts_in_gpg_signed_by_our_primary(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    raw = encrypt_mail(our_mail(BOB), sender=alice, recipients={BOB: peer.public})
    result = peer.gpg.decrypt(armored_part(raw), always_trust=True)
    assert result.ok, result.stderr  # .ok, not .valid: python-gnupg's trap (see the notes)
    assert result.valid
    assert result.fingerprint == alice.fingerprint  # the signing key IS the primary
    assert result.pubkey_fingerprint == alice.fingerprint
    inner = BytesParser(policy=email.policy.default).parsebytes(result.data)
    assert inner["Subject"] == "The real subject"
    assert inner.get_param("protected-headers") == "v1"
    assert "DECRYPTION_OKAY" in result.stderr and "GOODMDC" in result.stderr  # SEIPDv1


def test_our_group_mail_carries_gossip_for_each_recipient(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    carol = SecretKey.generate("carol@example.com")
    raw = encrypt_mail(
        our_mail(f"{BOB}, Carol <carol@example.com>"),
        sender=alice,
        recipients={BOB: peer.public, "carol@example.com": carol.public_key},
    )
    result = peer.gpg.decrypt(armored_part(raw), always_trust=True)
    assert result.ok and result.fingerprint == alice.fingerprint, result.stderr
    inner = BytesParser(policy=email.policy.default).parsebytes(result.data)
    gossip = [
        autocrypt.parse_header(str(v), gossip=True) for v in inner.get_all("Autocrypt-Gossip")
    ]
    assert {g.addr: g.key.fingerprint for g in gossip} == {
        BOB: peer.fingerprint,
        "carol@example.com": carol.fingerprint,
    }
    [own] = inner.get_all("Autocrypt")
    assert autocrypt.parse_header(str(own)).key.fingerprint == alice.fingerprint
    # Carol (rpgp) reads the same mail; gpg's key for Bob was minimised into the gossip.
    assert open_mail(raw, carol).verification.status is SignatureStatus.GOOD


def test_gpg_reads_encrypt_output_for_several_recipients(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    armored = encrypt(b"to both", signer=alice, recipients=[peer.public, alice.public_key])
    result = peer.gpg.decrypt(armored, always_trust=True)
    assert result.ok and result.data == b"to both"
    assert decrypt(armored, alice, verify_with=[alice.public_key]).plaintext == b"to both"


def test_gpg_reads_mail_with_hidden_recipients(peer: Peer, alice) -> None:
    import_ours(peer, alice.public_key)
    armored = encrypt(b"anonymous", signer=alice, recipients=[peer.public], hide_recipients=True)
    result = peer.gpg.decrypt(armored, always_trust=True)
    assert result.ok and result.data == b"anonymous", result.stderr


@pytest.mark.parametrize(("primary_expiry", "message"), [("1d", "expired"), ("never", "usable")])
def test_expired_gpg_keys_are_unusable(peer: Peer, primary_expiry: str, message: str) -> None:
    """Made in 2020 with one day of validity (the whole key, or only its encryption subkey):
    Level 1 treats such a key as absent."""
    past = ["--faked-system-time", "20200101T000000", "--passphrase", "", "--pinentry-mode"]
    past.append("loopback")
    address = "old@example.net"
    peer.run(*past, "--quick-gen-key", address, "ed25519", "cert,sign", primary_expiry, data=b"")
    [old] = [k for k in peer.gpg.list_keys() if address in k["uids"][0]]
    peer.run(*past, "--quick-add-key", old["fingerprint"], "cv25519", "encr", "1d", data=b"")
    key = PublicKey.from_bytes(peer.run("--export", old["fingerprint"], data=b"").stdout)
    with pytest.raises(KeyFormatError, match=message):
        key.encryption_subkey_fingerprint  # noqa: B018
    state = autocrypt.PeerState(address, 1, 1, key.to_bytes(), autocrypt.MUTUAL)
    assert autocrypt.recommend(state).recommendation is autocrypt.Recommendation.DISABLE


def test_signature_by_a_gpg_signing_subkey_is_good_but_not_primary(peer: Peer, alice) -> None:
    """Plain gpg users often sign with a subkey. We accept it (verified against the bound
    subkey) and say so: Delta Chat would count the same mail as unsigned."""
    loopback = ["--passphrase", "", "--pinentry-mode", "loopback"]
    peer.run(*loopback, "--quick-add-key", peer.fingerprint, "ed25519", "sign", "never", data=b"")
    public = PublicKey.from_armored(peer.gpg.export_keys(peer.fingerprint))
    signing = public.fingerprints() - {peer.fingerprint, public.encryption_subkey_fingerprint}
    [subkey] = signing
    import_ours(peer, alice.public_key)
    sent = peer.gpg.encrypt(b"x", [alice.fingerprint], sign=peer.fingerprint, always_trust=True)
    verification = decrypt(str(sent), alice, verify_with=[public]).verification
    assert verification.status is SignatureStatus.GOOD
    assert (verification.signer_fingerprint, verification.key_fingerprint) == (
        subkey,
        peer.fingerprint,
    )
    assert not verification.signed_by_primary
