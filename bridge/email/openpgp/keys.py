"""The one module that talks to the OpenPGP engine (rpgp-py, imported as `openpgp`).

Everything else in this package sees only `SecretKey`, `PublicKey`, plain bytes and the small
result types below, so the engine can be swapped by rewriting this file alone.

Interop choices (see /work/shared/notes/openpgp-interop.md for the measurements):
- keys are v4 (RFC 4880), an Ed25519 primary that signs and certifies (flags 03) and a Cv25519
  encryption subkey (flags 04), without the SEIPDv2 feature: GnuPG 2.2 can read mail to them;
- mail is signed with the PRIMARY key: Delta Chat verifies against the primary only;
- SEIPDv1 unless every recipient advertises SEIPDv2 (rpgp's helpers default to v2).

Every call here holds the GIL for its whole duration (about 10 ms per MB): run it in a thread
(`asyncio.to_thread`) so the event loop is not blocked by the Python side, and bound the input.
"""

from __future__ import annotations

import enum
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from openpgp.composed import (
    DetachedSignature,
    EncryptionCaps,
    KeyType,
    Message,
    MessageBuilder,
    SecretKeyParamsBuilder,
    SignedPublicKey,
    SignedSecretKey,
    SubkeyParamsBuilder,
)
from openpgp.errors import Error as _EngineError
from openpgp.packet import Packet

log = logging.getLogger("bridge.email.openpgp")

# Ciphertext above this is refused before the engine sees it. A mail is bounded long before
# this by the SMTP size limit; this is the last line. Note that compressed content can expand
# (a 380 KB gpg message of zeros decrypts to 300 MB): the engine decompresses eagerly, up to
# its own 1 GiB buffer cap, so callers should also keep this well below their memory budget.
MAX_CIPHERTEXT_BYTES = 32 * 1024 * 1024
MAX_KEY_BYTES = 64 * 1024  # a transferable public key larger than this is not a mail key

_PREFERRED_SYMMETRIC = ["aes256", "aes128"]
_PREFERRED_HASH = ["sha512", "sha256"]
_PREFERRED_COMPRESSION = ["zlib", "zip", "uncompressed"]
_SIGNATURE_HASH = "sha256"


class OpenPGPError(Exception):
    """Anything the OpenPGP layer refuses; `code` is the engine's broad category when known."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class KeyFormatError(OpenPGPError):
    """Key bytes that do not parse, fail their self-signatures, or cannot be used."""


class DecryptionError(OpenPGPError):
    """Not an OpenPGP message, not for this key, or tampered with (MDC / AEAD failure)."""


class TooLargeError(OpenPGPError):
    """Input above the configured limit; refused before any work is done."""


class SignatureStatus(enum.Enum):
    GOOD = "good"  # verified against one of the given keys
    BAD = "bad"  # made by one of the given keys (by issuer), but does not verify
    UNKNOWN_SIGNER = "unknown-signer"  # signed, but by none of the given keys
    UNSIGNED = "unsigned"


@dataclass(frozen=True)
class Verification:
    status: SignatureStatus
    # The issuer fingerprint of the signature that was checked (uppercase hex), which is the
    # signing subkey's when a subkey signed; None when unsigned or the issuer is not named.
    signer_fingerprint: str | None = None
    # The primary fingerprint of the certificate that verified it (GOOD only).
    key_fingerprint: str | None = None

    @property
    def signed_by_primary(self) -> bool:
        return self.status is SignatureStatus.GOOD and (
            self.signer_fingerprint == self.key_fingerprint
        )


@dataclass(frozen=True)
class Decrypted:
    # The plaintext: decrypted mail is private, keep it out of logs and tracebacks.
    plaintext: bytes = field(repr=False)
    verification: Verification


def _hex(value: str) -> str:
    return value.upper()


def _wrap(error: _EngineError, kind: type[OpenPGPError], what: str) -> OpenPGPError:
    # The engine's message names packets and algorithms, never key material or plaintext;
    # some carry a whole Rust backtrace after the reason, which is no use in a log line.
    reason = str(error).split(", backtrace:")[0].split("\n")[0][:200]
    return kind(f"{what}: {reason}", getattr(error, "code", None))


# --- keys ------------------------------------------------------------------------------------


class _KeyFacts:
    """What public and secret keys both tell about themselves (``_key``: the engine's key)."""

    _key: SignedPublicKey | SignedSecretKey

    @property
    def fingerprint(self) -> str:
        return _hex(self._key.fingerprint)

    @property
    def user_ids(self) -> list[str]:
        return list(self._key.user_ids)

    @property
    def created_at(self) -> int:
        return int(self._key.created_at)


class PublicKey(_KeyFacts):
    """A peer's (or our own) transferable public key, bindings verified on load."""

    __slots__ = ("_key",)

    def __init__(self, native: SignedPublicKey) -> None:
        self._key = native

    @classmethod
    def from_bytes(cls, data: bytes) -> PublicKey:
        """A binary transferable public key (an Autocrypt `keydata`, decoded)."""
        if len(data) > MAX_KEY_BYTES:
            raise KeyFormatError(f"public key of {len(data)} bytes is above {MAX_KEY_BYTES}")
        try:
            native = SignedPublicKey.from_bytes(bytes(data))
            native.verify_bindings()
        except _EngineError as error:
            raise _wrap(error, KeyFormatError, "not a usable public key") from None
        return cls(native)

    @classmethod
    def from_armored(cls, text: str) -> PublicKey:
        if len(text) > 2 * MAX_KEY_BYTES:
            raise KeyFormatError("armored public key too large")
        try:
            native, _headers = SignedPublicKey.from_armor(text)
            native.verify_bindings()
        except _EngineError as error:
            raise _wrap(error, KeyFormatError, "not a usable public key") from None
        return cls(native)

    @property
    def native(self) -> SignedPublicKey:
        """The engine's object; only for code in this module and its tests."""
        return self._key

    def to_bytes(self) -> bytes:
        return bytes(self._key.to_bytes())

    def to_armored(self) -> str:
        return self._key.to_armored()

    def fingerprints(self) -> set[str]:
        """The primary's and every subkey's fingerprint (uppercase hex)."""
        return {self.fingerprint} | {_hex(sub.key.fingerprint) for sub in self._key.public_subkeys}

    def key_ids(self) -> set[str]:
        return {_hex(self._key.key_id)} | {_hex(sub.key.key_id) for sub in self._key.public_subkeys}

    @property
    def encryption_subkey_fingerprint(self) -> str:
        """The subkey mail to this key is encrypted to (KeyFormatError when none is usable)."""
        return _hex(_encryption_subkey(self._key).key.fingerprint)

    @property
    def supports_seipd_v2(self) -> bool:
        """Whether the key advertises SEIPDv2 (features 0x08) in its self-signatures."""
        for signature in _self_signatures(self._key):
            features = signature.features()
            if features is not None and features.seipd_v2:
                return True
        return False

    def minimal(self, address: str | None = None) -> PublicKey:
        """Only what Autocrypt sends: primary, one user ID (the one naming `address` when there
        is one) with its newest self-signature, the encryption subkey and its newest binding."""
        packets = Packet.from_bytes_many(self.to_bytes())
        keep = [packets[0]]
        keep += _pick_user_id(packets, address)
        subkey_fp = self.encryption_subkey_fingerprint
        keep += _pick_subkey(packets, subkey_fp)
        data = b"".join(bytes(packet.to_bytes()) for packet in keep)
        return PublicKey.from_bytes(data)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and self.to_bytes() == other.to_bytes()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"PublicKey(fingerprint={self.fingerprint!r})"


class SecretKey(_KeyFacts):
    """A mailbox's secret key. Its repr shows only the fingerprint; `to_bytes` is the one way
    the secret leaves this object, for the caller to seal (bridge.crypto.sealed.seal_bytes)."""

    __slots__ = ("_key",)

    def __init__(self, native: SignedSecretKey) -> None:
        self._key = native

    @classmethod
    def generate(cls, address: str, created_at: int | None = None) -> SecretKey:
        """A new Autocrypt-shaped key whose user ID is `address` (no expiry, no passphrase:
        it is protected at rest by sealing, not by an OpenPGP passphrase)."""
        created = int(time.time()) if created_at is None else created_at
        subkey = (
            SubkeyParamsBuilder()
            .version(4)
            .key_type(KeyType.ecdh("curve25519"))
            .can_encrypt(EncryptionCaps.communication())
            .created_at(created)
            .build()
        )
        builder = (
            SecretKeyParamsBuilder()
            .version(4)
            .key_type(KeyType.ed25519_legacy())
            .can_sign(True)
            .can_certify(True)
            .created_at(created)
            .feature_seipd_v1(True)
            .feature_seipd_v2(False)
            .preferred_symmetric_algorithms(_PREFERRED_SYMMETRIC)
            .preferred_hash_algorithms(_PREFERRED_HASH)
            .preferred_compression_algorithms(_PREFERRED_COMPRESSION)
            .primary_user_id(address)
            .subkey(subkey)
        )
        try:
            key = cls(builder.generate())
        except _EngineError as error:
            raise _wrap(error, KeyFormatError, "key generation failed") from None
        log.info("generated OpenPGP key %s", key.fingerprint)
        return key

    @classmethod
    def from_bytes(cls, data: bytes) -> SecretKey:
        try:
            native = SignedSecretKey.from_bytes(bytes(data))
            native.verify_bindings()
        except _EngineError as error:
            raise _wrap(error, KeyFormatError, "not a usable secret key") from None
        return cls(native)

    @classmethod
    def from_armored(cls, text: str) -> SecretKey:
        try:
            native, _headers = SignedSecretKey.from_armor(text)
            native.verify_bindings()
        except _EngineError as error:
            raise _wrap(error, KeyFormatError, "not a usable secret key") from None
        return cls(native)

    @property
    def native(self) -> SignedSecretKey:
        return self._key

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self._key.to_public_key())

    def to_bytes(self) -> bytes:
        """The secret key, binary and unprotected: seal it before it is stored."""
        return bytes(self._key.to_bytes())

    def to_armored(self) -> str:
        return self._key.to_armored()

    def __repr__(self) -> str:
        return f"SecretKey(fingerprint={self.fingerprint!r})"


def _self_signatures(key: SignedPublicKey) -> list:
    """Direct-key and user ID signatures made by the key itself (not third-party ones)."""
    own = {_hex(key.fingerprint), _hex(key.key_id)}
    signatures = list(key.details.direct_signatures)
    for user in key.details.users:
        signatures += list(user.signatures)
    return [s for s in signatures if _issuers(s) & own]


def _newest(signatures: Sequence) -> object | None:
    return max(signatures, key=lambda s: s.created() or 0, default=None)


def _encryption_subkey(key: SignedPublicKey):  # -> SignedPublicSubKey
    """The newest subkey whose newest binding allows encryption, of a key that is neither
    revoked nor expired (KeyFormatError otherwise: "known to be unusable", Level 1)."""
    now = time.time()
    if key.details.revocation_signatures:
        raise KeyFormatError(f"key {_hex(key.fingerprint)} is revoked")
    primary = _newest(_self_signatures(key))
    lifetime = primary.key_expiration_time() if primary is not None else None
    if lifetime and key.created_at + lifetime <= now:
        raise KeyFormatError(f"key {_hex(key.fingerprint)} has expired")
    usable = []
    for subkey in key.public_subkeys:
        signatures = list(subkey.signatures)
        if any(s.typ() == "subkey-revocation" for s in signatures):
            continue  # a revocation is final, whatever was signed after it
        binding = _newest([s for s in signatures if s.typ() == "subkey-binding"])
        if binding is None or not subkey.key.algorithm.can_encrypt():
            continue
        flags = binding.key_flags()
        if not (flags.encrypt_communications or flags.encrypt_storage):
            continue
        lifetime = binding.key_expiration_time()
        if lifetime and subkey.key.created_at + lifetime <= now:
            continue
        usable.append(subkey)
    if not usable:
        raise KeyFormatError(f"key {_hex(key.fingerprint)} has no usable encryption subkey")
    return max(usable, key=lambda s: s.key.created_at)


def _pick_user_id(packets: list, address: str | None) -> list:
    """[UserId, newest self-signature] for the user ID naming `address`, else the first."""
    groups: list[list] = []
    for packet in packets[1:]:
        if packet.kind == "user-id":
            groups.append([packet])
        elif packet.kind in ("public-subkey", "user-attribute"):
            break
        elif groups and packet.kind == "signature":
            groups[-1].append(packet)
    if not groups:
        raise KeyFormatError("key has no user ID")
    wanted = (address or "").lower()

    def names(group: list) -> bool:
        text = bytes(group[0].value.id).decode("utf-8", "replace").lower()
        return bool(wanted) and (text == wanted or f"<{wanted}>" in text)

    group = next((g for g in groups if names(g)), groups[0])
    own = [p for p in group[1:] if p.value.typ() and p.value.typ().startswith("cert")]
    if not own:
        raise KeyFormatError("user ID without a self-signature")
    return [group[0], max(own, key=_created)]


def _pick_subkey(packets: list, fingerprint: str) -> list:
    for index, packet in enumerate(packets):
        if packet.kind == "public-subkey" and _hex(packet.value.fingerprint) == fingerprint:
            bindings = []
            for follower in packets[index + 1 :]:
                if follower.kind != "signature":
                    break
                if follower.value.typ() == "subkey-binding":
                    bindings.append(follower)
            if bindings:
                return [packet, max(bindings, key=_created)]
    raise KeyFormatError("encryption subkey not found in the key's packets")


def _created(packet) -> int:
    return packet.value.created() or 0


# --- messages --------------------------------------------------------------------------------


def _symmetric_for(recipients: Sequence[PublicKey]) -> str:
    """AES-256 unless some recipient lists preferences without it (then AES-128 if all list
    that); an empty list is read as "no stated preference", as every current peer does."""
    lists = []
    for recipient in recipients:
        for signature in _self_signatures(recipient.native):
            preferred = [str(a) for a in signature.preferred_symmetric_algs()]
            if preferred:
                lists.append(preferred)
                break
    for candidate in _PREFERRED_SYMMETRIC:
        if all(candidate in preferred for preferred in lists):
            return candidate
    return _PREFERRED_SYMMETRIC[0]


def encrypt(
    data: bytes,
    *,
    signer: SecretKey,
    recipients: Sequence[PublicKey],
    compress: bool = True,
    hide_recipients: bool = False,
) -> str:
    """`data` signed with the signer's PRIMARY key and encrypted to each recipient's
    encryption subkey, as an armored OpenPGP message. The caller includes the sender's own
    public key in `recipients` (Autocrypt: mail is also encrypted to the sender).

    SEIPDv2 (AES-256-OCB) only when every recipient other than the signer's own key advertises
    it: our own keys do not advertise it (for GnuPG 2.2's sake) but this engine reads both."""
    if not recipients:
        raise OpenPGPError("no recipients")
    own = signer.fingerprint
    peers = [r for r in recipients if r.fingerprint != own]
    builder = MessageBuilder.from_bytes("", bytes(data))
    if compress:
        builder = builder.compression("zlib")  # what gpg and Delta Chat do by default
    symmetric = _symmetric_for(peers)
    if peers and all(peer.supports_seipd_v2 for peer in peers):
        builder = builder.seipd_v2(symmetric, "ocb")
    else:
        builder = builder.seipd_v1(symmetric)
    unique = {recipient.fingerprint: recipient for recipient in recipients}
    try:
        builder = builder.sign(signer.native, None, _SIGNATURE_HASH)
        for recipient in unique.values():
            subkey = _encryption_subkey(recipient.native)
            if hide_recipients:
                builder = builder.encrypt_to_key_anonymous(subkey)
            else:
                builder = builder.encrypt_to_key(subkey)
        return builder.to_armored_string()
    except _EngineError as error:
        raise _wrap(error, OpenPGPError, "encryption failed") from None


def _load_message(data: bytes | str, max_bytes: int) -> Message:
    if len(data) > max_bytes:
        raise TooLargeError(f"ciphertext of {len(data)} bytes is above {max_bytes}")
    try:
        if isinstance(data, str) or bytes(data[:64]).lstrip().startswith(b"-----BEGIN PGP"):
            text = data if isinstance(data, str) else bytes(data).decode("ascii")
            message, _headers = Message.from_armor(text)
        else:
            message = Message.from_bytes(bytes(data))
    except UnicodeDecodeError:
        raise DecryptionError("not an OpenPGP message: armor is not ASCII") from None
    except _EngineError as error:
        raise _wrap(error, DecryptionError, "not an OpenPGP message") from None
    return message


def decrypt(
    data: bytes | str,
    key: SecretKey,
    *,
    verify_with: Sequence[PublicKey] | Callable[[bytes], Sequence[PublicKey]] = (),
    max_bytes: int = MAX_CIPHERTEXT_BYTES,
) -> Decrypted:
    """Decrypt an armored or binary message with `key` and check its signature against
    `verify_with` (compressed and uncompressed content alike). `verify_with` may be a function
    of the plaintext, for a key that arrives inside the message (an Autocrypt header in the
    protected headers): the signature is checked after it is called, without decrypting twice.
    DecryptionError for anything that is not a message for this key or fails its integrity
    check; TooLargeError above `max_bytes`. A bad signature is a result (BAD), not an error:
    the caller decides."""
    message = _load_message(data, max_bytes)
    if message.kind != "encrypted":
        raise DecryptionError(f"not an encrypted message ({message.kind})")
    try:
        decrypted = message.decrypt(None, key.native)
        plaintext = bytes(decrypted.as_data_vec())
    except _EngineError as error:
        # MDC/AEAD failures land here: no plaintext of a tampered message is ever returned.
        raise _wrap(error, DecryptionError, "cannot decrypt") from None
    keys = verify_with(plaintext) if callable(verify_with) else verify_with
    return Decrypted(plaintext, _verify_message(decrypted, keys))


def _verify_message(decrypted, keys: Sequence[PublicKey]) -> Verification:
    """GOOD if any signature verifies against any key; BAD if one names a given key as its
    issuer and fails; UNKNOWN_SIGNER if none names a given key."""
    signatures = list(decrypted.signatures())
    if not signatures:
        return Verification(SignatureStatus.UNSIGNED)
    issuers = [_issuers(signature) for signature in signatures]
    bad: str | None = None
    for key in keys:
        known = key.fingerprints() | key.key_ids()
        for index, names in enumerate(issuers):
            if not names & known:
                continue
            try:
                decrypted.verify(key.native, index)
            except _EngineError:
                bad = bad or _issuer_fingerprint(signatures[index])
                continue
            return Verification(
                SignatureStatus.GOOD, _issuer_fingerprint(signatures[index]), key.fingerprint
            )
    if bad is not None:
        return Verification(SignatureStatus.BAD, bad)
    return Verification(SignatureStatus.UNKNOWN_SIGNER, _issuer_fingerprint(signatures[0]))


def _issuers(signature) -> set[str]:
    return {_hex(v) for v in signature.issuer_fingerprint()} | {
        _hex(v) for v in signature.issuer_key_id()
    }


def _issuer_fingerprint(signature) -> str | None:
    fingerprints = signature.issuer_fingerprint()
    if fingerprints:
        return _hex(fingerprints[0])
    key_ids = signature.issuer_key_id()
    return _hex(key_ids[0]) if key_ids else None


# --- detached signatures (multipart/signed) --------------------------------------------------


def sign_detached(data: bytes, key: SecretKey) -> str:
    """An armored binary-mode signature over `data` by the PRIMARY key (RFC 3156 signs the
    canonical CRLF form of the first part, which the caller passes as `data`)."""
    try:
        signature = DetachedSignature.sign_binary_data(
            _Rng(), key.native, None, _SIGNATURE_HASH, bytes(data)
        )
        return signature.to_armored()
    except _EngineError as error:
        raise _wrap(error, OpenPGPError, "signing failed") from None


def verify_detached(data: bytes, signature: bytes | str, keys: Sequence[PublicKey]) -> Verification:
    """Check a detached signature (armored or binary) over `data` against `keys`.
    A signature that does not even parse counts as BAD: something was attached and fails."""
    try:
        if isinstance(signature, str) or bytes(signature).lstrip().startswith(b"-----BEGIN"):
            text = signature if isinstance(signature, str) else bytes(signature).decode("ascii")
            parsed, _headers = DetachedSignature.from_armor_many(text)
        else:
            parsed = DetachedSignature.from_bytes_many(bytes(signature))
    except (_EngineError, UnicodeDecodeError):
        return Verification(SignatureStatus.BAD)
    if not parsed:
        return Verification(SignatureStatus.UNSIGNED)
    bad: str | None = None
    for key in keys:
        known = key.fingerprints() | key.key_ids()
        for detached in parsed:
            if not _issuers(detached.signature) & known:
                continue
            issuer = _issuer_fingerprint(detached.signature)
            try:
                detached.verify(key.native, bytes(data))
            except _EngineError:
                bad = bad or issuer
                continue
            return Verification(SignatureStatus.GOOD, issuer, key.fingerprint)
    if bad is not None:
        return Verification(SignatureStatus.BAD, bad)
    return Verification(SignatureStatus.UNKNOWN_SIGNER, _issuer_fingerprint(parsed[0].signature))


class _Rng:
    """The engine's CryptoRng protocol, from the OS generator."""

    def randbytes(self, n: int) -> bytes:
        return secrets.token_bytes(n)
