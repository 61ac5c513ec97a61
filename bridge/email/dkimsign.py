"""DKIM signing of outgoing mail (RFC 6376, with Ed25519 from RFC 8463).

dkimpy makes the signature; this module decides what it covers and handles the key: loading it
with errors an admin can act on, generating one, and printing the DNS record to publish.

Signatures are relaxed/relaxed, so the usual rewrapping and whitespace changes by relays do not
break them, and From is signed once more than it occurs ("oversigned"), so a From added later
invalidates the signature instead of letting a verifier see a different author.

Signing is CPU-bound (dkimpy's RSA is pure Python, about 10 ms per message): call
:func:`sign` from a thread when on the event loop.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from ..config import ConfigError

log = logging.getLogger(__name__)

KEY_CONFIG = "email.dkim.private_key"
SELECTOR_CONFIG = "email.dkim.selector"

# What a reply or a bridged message carries that identifies and shapes it. Received, Return-Path
# and the like are left out: relays add those, and signing them would only make us fragile.
SIGNED_HEADERS = (
    b"from",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
)
# Verifiers reject smaller RSA keys (RFC 8301); 2048 bits is what they recommend.
MIN_RSA_BITS = 1024
DEFAULT_RSA_BITS = 2048
# One DNS TXT character-string holds at most 255 bytes (RFC 1035 §3.3.14).
TXT_CHUNK = 255

# Selectors and signing domains are DNS names (RFC 6376 §3.1, §3.5): letters, digits and hyphens
# in dot-separated labels. Checking this also keeps line breaks and ";" out of the header.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_P_TAG = re.compile(r"(?:^|;)\s*p=")


@dataclass(frozen=True)
class DkimKey:
    """A signing key and where its public half is published: ``<selector>._domainkey.<domain>``.

    ``private_pem`` is an RSA or Ed25519 private key in PEM, PKCS#1 or PKCS#8, unencrypted.
    Constructing one checks it (:class:`ValueError`); :meth:`load` does the same with errors
    that name the config key.
    """

    selector: str
    domain: str
    private_pem: bytes = field(repr=False)  # keep the key out of logs and tracebacks
    # What dkimpy signs with, worked out once: its a= value and the key in the one form it reads
    # (PKCS#1 PEM for RSA, the base64 seed for Ed25519).
    algorithm: str = field(init=False, compare=False)
    _signing_key: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _DNS_NAME.fullmatch(self.selector):
            raise ValueError(f"DKIM selector {self.selector!r} is not a DNS name")
        if not _DNS_NAME.fullmatch(self.domain):
            raise ValueError(f"DKIM signing domain {self.domain!r} is not a domain name")
        key = serialization.load_pem_private_key(self.private_pem, password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            algorithm = "rsa-sha256"
            signing_key = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = "ed25519-sha256"
            signing_key = base64.b64encode(
                key.private_bytes(
                    serialization.Encoding.Raw,
                    serialization.PrivateFormat.Raw,
                    serialization.NoEncryption(),
                )
            )
        else:
            raise ValueError(f"DKIM needs an RSA or Ed25519 key, not {type(key).__name__}")
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "_signing_key", signing_key)

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @classmethod
    def load(cls, path: str, selector: str, domain: str) -> DkimKey:
        """Read and check the key at ``path``; problems raise :class:`ConfigError`."""
        if not selector:
            raise ConfigError(SELECTOR_CONFIG, "is empty; set the selector the key is published at")
        if not _DNS_NAME.fullmatch(selector):
            raise ConfigError(
                SELECTOR_CONFIG, f"{selector!r} is not a DNS label (letters, digits, hyphens)"
            )
        try:
            with open(path, "rb") as file:
                data = file.read()
                mode = os.fstat(file.fileno()).st_mode
        except FileNotFoundError:
            raise ConfigError(KEY_CONFIG, f"{path} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(KEY_CONFIG, f"{path} is a directory, not a key file") from None
        except OSError as e:
            raise ConfigError(KEY_CONFIG, f"cannot read {path}: {e.strerror or e}") from None
        _check(data, path)
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            # Not fatal (a container may mount it that way), but anyone who can read the key can
            # send mail as the domain.
            log.warning("DKIM key %s is readable by others than its owner; chmod 600 it", path)
        return cls(selector, domain.rstrip(".").lower(), data)


def _check(data: bytes, path: str) -> None:
    """Raise a :class:`ConfigError` saying what is wrong with a key file, if anything."""
    if b"-----BEGIN" not in data:
        raise ConfigError(KEY_CONFIG, f"{path} is not a PEM file (no -----BEGIN line)")
    if b"PRIVATE KEY-----" not in data:
        raise ConfigError(KEY_CONFIG, f"{path} holds no private key (a public key or certificate?)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(
            KEY_CONFIG, f"{path} is encrypted; give an unencrypted key (keep it mode 600)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise ConfigError(KEY_CONFIG, f"{path} is not a readable private key: {e}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(
                KEY_CONFIG,
                f"{path} is a {key.key_size}-bit RSA key; verifiers reject fewer than "
                f"{MIN_RSA_BITS} bits (use {DEFAULT_RSA_BITS})",
            )
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        try:
            import nacl.signing  # noqa: F401  dkimpy signs Ed25519 with PyNaCl
        except ImportError:
            raise ConfigError(
                KEY_CONFIG, f"{path} is an Ed25519 key, which needs PyNaCl (pip install pynacl)"
            ) from None
    else:
        raise ConfigError(
            KEY_CONFIG, f"{path} holds a {type(key).__name__}; DKIM needs an RSA or Ed25519 key"
        )


def sign(raw: bytes, key: DkimKey) -> bytes:
    """Return ``raw`` with a DKIM-Signature header prepended.

    Raises :class:`ValueError` for a message without exactly one From header, or one dkimpy
    cannot parse.
    """
    # Match the message's own line endings, so the result does not mix them.
    newline = raw.find(b"\n")
    linesep = b"\r\n" if newline > 0 and raw[newline - 1 : newline] == b"\r" else b"\n"
    try:
        message = dkim.DKIM(raw, signature_algorithm=key.algorithm.encode("ascii"), linesep=linesep)
    except dkim.DKIMException as e:
        raise ValueError(f"cannot DKIM-sign an unparsable message: {e}") from e
    counts = Counter(name.lower() for name, _value in message.headers)
    if counts[b"from"] != 1:
        raise ValueError(f"a message must have exactly one From header, not {counts[b'from']}")
    include: list[bytes] = []
    for name in SIGNED_HEADERS:
        # Every occurrence, so none can be swapped out; From once more, so none can be added.
        include += [name] * (counts[name] + (name == b"from"))
    header = message.sign(
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key._signing_key,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    return header + raw


def generate_key(path: str, *, bits: int = DEFAULT_RSA_BITS) -> bytes:
    """Write a new RSA private key (PKCS#1 PEM) to ``path``, readable by its owner only.

    An existing file is never replaced (:class:`FileExistsError`): it may be the key whose public
    half is already in DNS, and losing it would break every signature until DNS is updated.
    """
    if bits < MIN_RSA_BITS:
        raise ValueError(f"DKIM RSA keys need at least {MIN_RSA_BITS} bits, not {bits}")
    if os.path.lexists(path):  # fail before spending time on key generation
        raise FileExistsError(f"{path} already exists; not overwriting it")
    pem = rsa.generate_private_key(public_exponent=65537, key_size=bits).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    # O_EXCL closes the race with the check above, and refuses to follow a planted symlink.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the mode given to open() is narrowed by the umask, never widened
        with os.fdopen(fd, "wb") as file:
            fd = -1
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)  # no half-written key left to be mistaken for a real one
        raise
    return pem


def dns_record(private_pem: bytes) -> str:
    """The TXT record value publishing the public half of ``private_pem``."""
    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode('ascii')}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        # RFC 8463 §4.2: the bare 32-byte key, not a SubjectPublicKeyInfo.
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode('ascii')}"
    raise ValueError(f"not an RSA or Ed25519 private key: {type(key).__name__}")


def dns_record_text(selector: str, domain: str, record: str) -> str:
    """The zone-file line for ``record``, its value split into strings of at most 255 bytes.

    A TXT record longer than 255 bytes must be given as several strings, which resolvers join
    back together; the split is put before ``p=`` so the tags read clearly.
    """
    if not record.isascii():
        raise ValueError("a DKIM record is ASCII")
    match = _P_TAG.search(record)
    cut = match.end() - 2 if match else 0
    pieces = [
        part[i : i + TXT_CHUNK]
        for part in (record[:cut], record[cut:])
        for i in range(0, len(part), TXT_CHUNK)
    ] or [""]
    quoted = " ".join('"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"' for p in pieces)
    return f"{selector}._domainkey.{domain.rstrip('.')}. IN TXT ( {quoted} )"
