"""bridge.email.openpgp.sandbox: open_mail in a worker process with a memory limit and a
deadline; a decompression bomb (built with zlib, encrypted as-is by gpg) is refused cleanly
and the worker comes back for the next mail."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Iterator

import pytest

from bridge.email.openpgp.keys import DecryptionError, KeyFormatError, SecretKey, SignatureStatus
from bridge.email.openpgp.pgpmime import KeySource, MailFormatError, encrypt_mail, open_mail
from bridge.email.openpgp.sandbox import ResourceLimitError, Worker

ALICE, BOB = "alice@example.org", "bob@example.net"


@pytest.fixture(scope="module")
def alice() -> SecretKey:
    return SecretKey.generate(ALICE)


@pytest.fixture(scope="module")
def bob() -> SecretKey:
    return SecretKey.generate(BOB)


@pytest.fixture
def worker() -> Iterator[Worker]:
    # 128 MiB: a Python with the engine loaded needs well under 64 MiB of address space.
    started = Worker(memory_bytes=128 * 1024 * 1024, timeout=20)
    try:
        yield started
    finally:
        started.close()


def mail_to_bob(alice: SecretKey, bob: SecretKey) -> bytes:
    return encrypt_mail(
        b"From: alice@example.org\r\nTo: bob@example.net\r\nSubject: real\r\n\r\nhello\r\n",
        sender=alice,
        recipients={BOB: bob.public_key},
    )


def test_same_answer_as_in_process(worker: Worker, alice, bob) -> None:
    raw = mail_to_bob(alice, bob)
    here = open_mail(raw, bob, peer_keys=[alice.public_key])
    there = worker.open_mail(raw, bob.to_bytes(), peer_keys=[alice.public_key.to_bytes()])
    assert there == here
    assert there.verification.status is SignatureStatus.GOOD
    assert there.key_source is KeySource.PEER
    second = worker.open_mail(raw, bob.to_bytes())  # the same child serves the next call
    assert second.key_source is KeySource.AUTOCRYPT_HEADER


@pytest.mark.parametrize(
    ("raw", "key", "error"),
    [
        (b"From: a@b\r\nContent-Type: multipart/encrypted; boundary=b\r\n\r\n--b--\r\n", None,
         MailFormatError),
        (None, b"\x00garbage", KeyFormatError),
        (None, "other", DecryptionError),
    ],
)  # fmt: skip
def test_errors_cross_the_boundary_as_themselves(worker, alice, bob, raw, key, error) -> None:
    raw = raw or mail_to_bob(alice, bob)
    secret = SecretKey.generate("x@example.net").to_bytes() if key == "other" else key
    with pytest.raises(error):
        worker.open_mail(raw, secret or bob.to_bytes())
    assert worker.open_mail(mail_to_bob(alice, bob), bob.to_bytes()).content  # still serving


def test_deadline_kills_and_the_next_call_restarts(alice, bob) -> None:
    slow = Worker(timeout=0.001)
    try:
        with pytest.raises(ResourceLimitError, match="too long"):
            slow.open_mail(mail_to_bob(alice, bob), bob.to_bytes())
        slow.timeout = 20
        assert slow.open_mail(mail_to_bob(alice, bob), bob.to_bytes()).content
    finally:
        slow.close()


def test_limit_is_checked_before_the_child_sees_it(worker: Worker, bob) -> None:
    with pytest.raises(ResourceLimitError.__mro__[1]):  # TooLargeError
        worker.open_mail(b"x" * 101, bob.to_bytes(), max_bytes=100)


def _packet(tag: int, body: bytes) -> bytes:
    """A new-format packet with a five-octet length (RFC 4880 §4.2.2.3)."""
    return bytes([0xC0 | tag, 0xFF]) + struct.pack(">I", len(body)) + body


def zlib_bomb(size: int) -> bytes:
    """A compressed-data packet (zlib) holding a literal-data packet of `size` zero bytes,
    built without ever holding the zeros: ~1 MB for 200 MB."""
    literal_header = bytes([0xCB, 0xFF]) + struct.pack(">I", size + 6) + b"b\x00\x00\x00\x00\x00"
    compressor = zlib.compressobj(1)
    chunks = [compressor.compress(literal_header)]
    chunk = bytes(1 << 20)
    for _ in range(size // len(chunk)):
        chunks.append(compressor.compress(chunk))
    chunks.append(compressor.flush())
    return _packet(8, b"\x02" + b"".join(chunks))


@pytest.mark.skipif(shutil.which("gpg") is None, reason="gpg is not installed (system-deps)")
def test_decompression_bomb_is_a_resource_limit_error(worker: Worker, alice, bob) -> None:
    home = tempfile.mkdtemp(prefix="gpg-")
    env = dict(os.environ, GNUPGHOME=home)
    gpg = ["gpg", "--batch", "--quiet", "--trust-model", "always"]
    try:
        subprocess.run([*gpg, "--import"], input=bob.public_key.to_bytes(), env=env, check=True)
        sealed = subprocess.run(
            [*gpg, "--armor", "--no-literal", "-z", "0", "-e", "-r", bob.fingerprint],
            input=zlib_bomb(200 * 1024 * 1024),
            env=env,
            check=True,
            capture_output=True,
        ).stdout.decode()
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    assert len(sealed) < 2 * 1024 * 1024  # small on the wire...
    raw = (
        f"From: {ALICE}\r\nContent-Type: multipart/encrypted;"
        ' protocol="application/pgp-encrypted"; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n"
        f"--b\r\nContent-Type: application/octet-stream\r\n\r\n{sealed}\r\n--b--\r\n"
    ).encode()
    with pytest.raises(ResourceLimitError):  # ...200 MB once decompressed: over 128 MiB
        worker.open_mail(raw, bob.to_bytes())
    assert worker.open_mail(mail_to_bob(alice, bob), bob.to_bytes()).content  # restarted
