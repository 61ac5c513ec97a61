"""PGP/MIME (RFC 3156) with protected headers: compose encrypted+signed mail, open incoming
encrypted or signed mail (inline PGP in a text/plain body too). No I/O.

Composing: the whole original entity (its headers included: "protected headers", marked
`protected-headers="v1"`) is signed with the sender's primary key and encrypted; the outer
message keeps only what transport needs, with the Subject replaced by `[...]`, as Delta Chat
does. Autocrypt for the sender, and Autocrypt-Gossip for each other To/Cc recipient of group
mail, go inside.

Opening: `open_mail` returns the inner entity, the signature status, and the headers found
inside (protected headers, Autocrypt, Autocrypt-Gossip) for autocrypt.mail_facts. Every call
that decrypts or verifies holds the GIL for its duration (about 10 ms per MB): callers run it
in a thread, and bound the input (keys.MAX_CIPHERTEXT_BYTES is enforced here too).
"""

from __future__ import annotations

import copy
import email.policy
import email.utils
import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.errors import MessageError
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser, BytesParser

from . import autocrypt
from .keys import (
    MAX_CIPHERTEXT_BYTES,
    DecryptionError,
    OpenPGPError,
    PublicKey,
    SecretKey,
    SignatureStatus,
    TooLargeError,
    Verification,
    decrypt,
    encrypt,
    verify_detached,
)

log = logging.getLogger("bridge.email.openpgp.pgpmime")

# Strict (defects raise), CRLF, and parsed headers written back exactly as they came: the
# email package would otherwise refold long ones (ids, Autocrypt keydata) on the way out.
POLICY = email.policy.strict.clone(linesep="\r\n", refold_source="none")
OUTER_SUBJECT = "[...]"

# Outside the encryption: what relays and MUAs need before decrypting (addresses, threading).
_OUTER_HEADERS = frozenset(
    {"from", "sender", "to", "cc", "reply-to", "date", "message-id", "in-reply-to"}
    | {"references", "auto-submitted", "precedence", "list-id", "list-unsubscribe"}
)
# Never inside the encrypted part: Bcc would reveal blind recipients to everyone; transport
# traces and signatures of the outer message mean nothing there.
_NEVER_INSIDE = frozenset(
    {"bcc", "mime-version", "received", "return-path", "dkim-signature", "arc-seal"}
    | {"arc-message-signature", "arc-authentication-results", "authentication-results"}
    | {"autocrypt", "autocrypt-gossip", "chat-version"}
)


class MailFormatError(OpenPGPError):
    """A mail that claims to be PGP/MIME (or signed) but does not have RFC 3156's shape."""


# --- compose ---------------------------------------------------------------------------------


def encrypt_mail(
    mail: EmailMessage | bytes,
    *,
    sender: SecretKey,
    recipients: Mapping[str, PublicKey],
    prefer_encrypt: str = autocrypt.MUTUAL,
    chat_version: bool = False,
    outer_autocrypt: bool = True,
    hide_recipients: bool = False,
) -> bytes:
    """The mail as PGP/MIME bytes (CRLF): signed by `sender`'s primary key, encrypted to every
    key in `recipients` (addr → key; Bcc recipients included) and to the sender.

    Every To/Cc address other than the sender's must have a key (ValueError otherwise: one
    unreadable copy is worse than a plain mail the caller chose knowingly). Mail to more than
    one recipient carries an Autocrypt-Gossip header inside for each To/Cc recipient.
    `chat_version` adds `Chat-Version: 1.0` inside (Delta Chat shows a chat message).
    `outer_autocrypt` repeats the sender's Autocrypt header outside for MUAs that only read
    outer headers (Thunderbird, K-9); Delta Chat sends it inside only. `hide_recipients`
    writes wildcard key IDs (gpg and Delta Chat try their keys); it is forced on when a key is
    for an address outside To/Cc (Bcc)."""
    message = _as_message(mail)
    sender_addr = _single_address(message, "From")
    keys = {addr.lower(): key for addr, key in recipients.items()}
    visible = _visible_recipients(message) - {sender_addr}
    missing = visible - keys.keys()
    if missing:
        raise ValueError(f"no key for {len(missing)} recipient(s)")
    own = sender.public_key
    header = autocrypt.build_header(sender_addr, own, prefer_encrypt)
    inner = _inner_part(message, header, chat_version)
    if len(visible) > 1:
        for addr in sorted(visible):
            inner.set_raw("Autocrypt-Gossip", autocrypt.build_header(addr, keys[addr], gossip=True))
    plaintext = _serialise(inner)
    # Key IDs in the session-key packets are readable by everyone, relays included: a key for
    # an address outside To/Cc would name the Bcc recipient, so then every key ID is hidden.
    blind = bool(keys.keys() - visible - {sender_addr})
    armored = encrypt(
        plaintext,
        signer=sender,
        recipients=[*keys.values(), own],
        hide_recipients=hide_recipients or blind,
    )
    outer = _outer_message(message, armored)
    if outer_autocrypt:
        outer.set_raw("Autocrypt", header)
    return _serialise(outer)


def _as_message(mail: EmailMessage | bytes) -> Message:
    if isinstance(mail, (bytes, bytearray, memoryview)):
        try:
            return BytesParser(policy=POLICY).parsebytes(bytes(mail))
        except MessageError as error:
            raise ValueError(f"the mail does not parse: {error}") from None
    return mail


def _single_address(message: Message, name: str) -> str:
    addresses = [a for _n, a in email.utils.getaddresses(_values(message, name)) if a]
    if len(addresses) != 1:
        raise ValueError(f"{name} must name exactly one address")
    return addresses[0].lower()


def _values(message: Message, name: str) -> list[str]:
    return [str(value) for value in message.get_all(name, [])]


def _visible_recipients(message: Message) -> set[str]:
    pairs = email.utils.getaddresses(_values(message, "To") + _values(message, "Cc"))
    return {address.lower() for _n, address in pairs if address}


def _inner_part(message: Message, header: autocrypt.HeaderField, chat_version: bool) -> Message:
    """The original entity with every header that may be read inside, marked v1."""
    inner = copy.deepcopy(message)
    for name in {key.lower() for key in inner.keys()}:
        if name in _NEVER_INSIDE:
            del inner[name]
    if inner.get("Content-Type") is None:
        inner["Content-Type"] = "text/plain; charset=us-ascii"
    inner.set_param("protected-headers", "v1")
    inner.set_raw("Autocrypt", header)
    if chat_version:
        inner.set_raw("Chat-Version", "1.0")
    return inner


def _outer_message(message: Message, armored: str) -> EmailMessage:
    outer = EmailMessage(policy=POLICY)
    for name, value in message.raw_items():
        if name.lower() in _OUTER_HEADERS:
            outer.set_raw(name, value)
    outer["Subject"] = OUTER_SUBJECT
    outer["MIME-Version"] = "1.0"
    outer["Content-Type"] = 'multipart/encrypted; protocol="application/pgp-encrypted"'
    version = EmailMessage(policy=POLICY)
    version["Content-Type"] = "application/pgp-encrypted"
    version["Content-Description"] = "PGP/MIME version identification"
    version.set_payload("Version: 1\r\n")
    payload = EmailMessage(policy=POLICY)
    payload["Content-Type"] = 'application/octet-stream; name="encrypted.asc"'
    payload["Content-Description"] = "OpenPGP encrypted message"
    payload["Content-Disposition"] = 'inline; filename="encrypted.asc"'
    payload.set_payload(armored)
    outer.set_payload([version, payload])
    return outer


def _serialise(message: Message) -> bytes:
    try:
        return message.as_bytes(policy=POLICY)
    except (MessageError, UnicodeError) as error:
        raise ValueError(f"the mail cannot be written: {error}") from None


# --- open ------------------------------------------------------------------------------------


class MailKind(enum.Enum):
    PGP_MIME = "pgp-mime"  # multipart/encrypted
    INLINE = "inline"  # -----BEGIN PGP MESSAGE----- in a text/plain body
    SIGNED = "signed"  # multipart/signed, not encrypted
    PLAIN = "plain"  # neither


class KeySource(enum.Enum):
    """Which key a GOOD signature was checked against."""

    PEER = "peer"  # one of the keys the caller passed (the stored peer state)
    AUTOCRYPT_HEADER = "autocrypt-header"  # the key in the Autocrypt header of the mail itself


@dataclass(frozen=True)
class OpenedMail:
    kind: MailKind
    # The inner MIME entity (headers + body, CRLF as sent): decrypted content is private,
    # so it stays out of the repr. For PLAIN mail, the mail itself.
    content: bytes = field(repr=False)
    verification: Verification = Verification(SignatureStatus.UNSIGNED)
    key_source: KeySource | None = None
    protected: bool = False  # the inner root part was marked protected-headers="v1"
    # Every header of the inner root part except Content-*, in order (Subject, From, ...).
    protected_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    autocrypt: tuple[str, ...] = field(default=(), repr=False)
    gossip: tuple[str, ...] = field(default=(), repr=False)

    @property
    def encrypted(self) -> bool:
        return self.kind in (MailKind.PGP_MIME, MailKind.INLINE)

    def inner_headers(self) -> Message:
        """The inner root part's headers, parsed (for autocrypt.mail_facts(protected=...))."""
        return BytesHeaderParser(policy=email.policy.default).parsebytes(self.content)


def open_mail(
    raw: bytes,
    key: SecretKey,
    *,
    peer_keys: Sequence[PublicKey] = (),
    max_bytes: int = MAX_CIPHERTEXT_BYTES,
) -> OpenedMail:
    """Decrypt and/or verify one received mail (raw RFC 5322 bytes, as received: a signed
    part is checked byte for byte). Signatures are checked against `peer_keys` and against the
    key in the sender's own Autocrypt header inside the encrypted part (addr = outer From), so
    a first encrypted mail from a new Delta Chat peer verifies; `key_source` says which.

    PRECONDITION: the outer From passed the bridge's sender checks.
    DecryptionError: not for this key, tampered, or not OpenPGP at all; MailFormatError: a
    broken RFC 3156 structure; TooLargeError: above `max_bytes`. A bad signature is not an
    error: `verification.status` is BAD and the caller decides (Delta Chat drops such mail)."""
    if len(raw) > max_bytes:
        raise TooLargeError(f"mail of {len(raw)} bytes is above {max_bytes}")
    try:
        outer = BytesParser(policy=email.policy.default).parsebytes(bytes(raw))
    except MessageError as error:
        raise MailFormatError(f"the mail does not parse: {error}") from None
    from_addrs = [a for _n, a in email.utils.getaddresses(_values(outer, "From")) if a]
    from_addr = from_addrs[0].lower() if len(from_addrs) == 1 else None
    content_type = outer.get_content_type()
    if content_type == "multipart/encrypted":
        data = _encrypted_payload(outer)
        return _open_encrypted(data, MailKind.PGP_MIME, key, peer_keys, from_addr, max_bytes)
    if content_type == "multipart/signed":
        return _open_signed(bytes(raw), MailKind.SIGNED, peer_keys, (), from_addr)
    inline = _inline_part(outer)
    if inline is not None:
        return _open_inline(inline, key, peer_keys, outer, from_addr, max_bytes)
    return OpenedMail(MailKind.PLAIN, bytes(raw))


def _encrypted_payload(outer: Message) -> bytes:
    """RFC 3156 §4: protocol application/pgp-encrypted, a Version: 1 part, then the data."""
    if outer.get_param("protocol", "").lower() != "application/pgp-encrypted":
        raise MailFormatError("multipart/encrypted without protocol application/pgp-encrypted")
    parts = outer.get_payload()
    if not isinstance(parts, list) or len(parts) != 2:
        raise MailFormatError("multipart/encrypted must have exactly two parts")
    control, data = parts
    if control.get_content_type() != "application/pgp-encrypted":
        raise MailFormatError("first part is not application/pgp-encrypted")
    control_text = control.get_payload(decode=True) or b""
    if not re.search(rb"^\s*Version:\s*1\s*$", control_text, re.M):
        raise MailFormatError("PGP/MIME version part does not say Version: 1")
    # Armored per RFC 3156; keys.decrypt also takes the binary form some senders base64 here.
    return data.get_payload(decode=True) or b""


def _open_encrypted(
    data: bytes,
    kind: MailKind,
    key: SecretKey,
    peer_keys: Sequence[PublicKey],
    from_addr: str | None,
    max_bytes: int,
) -> OpenedMail:
    found: list[PublicKey] = []

    def keys_for(plaintext: bytes) -> list[PublicKey]:
        found.extend(_sender_keys(_headers_of(plaintext), from_addr))
        return [*peer_keys, *found]

    decrypted = decrypt(data, key, verify_with=keys_for, max_bytes=max_bytes)
    content, verification = decrypted.plaintext, decrypted.verification
    if _headers_of(content).get_content_type() == "multipart/signed":
        # Sign-then-encrypt as two layers (Enigmail's old style, some MUAs still).
        signed = _open_signed(content, kind, peer_keys, found, from_addr)
        if verification.status is SignatureStatus.UNSIGNED:
            return signed
        content = signed.content
    return _opened(kind, content, verification, peer_keys)


def _opened(
    kind: MailKind, content: bytes, verification: Verification, peer_keys: Sequence[PublicKey]
) -> OpenedMail:
    source = None
    if verification.status is SignatureStatus.GOOD:
        known = {k.fingerprint for k in peer_keys}
        source = KeySource.PEER if verification.key_fingerprint in known else None
        source = source or KeySource.AUTOCRYPT_HEADER
    headers = _headers_of(content)
    return OpenedMail(
        kind=kind,
        content=content,
        verification=verification,
        key_source=source,
        protected=str(headers.get_param("protected-headers", "")).lower() == "v1",
        protected_headers=tuple(
            (name, str(value))
            for name, value in headers.items()
            if not name.lower().startswith("content-")
        ),
        autocrypt=tuple(_values(headers, "Autocrypt")),
        gossip=tuple(_values(headers, "Autocrypt-Gossip")),
    )


def _headers_of(entity: bytes) -> Message:
    try:
        return BytesHeaderParser(policy=email.policy.default).parsebytes(entity)
    except MessageError as error:
        raise MailFormatError(f"the decrypted part does not parse: {error}") from None


def _sender_keys(headers: Message, from_addr: str | None) -> list[PublicKey]:
    """The key of the one valid Autocrypt header for From in `headers`, if there is one."""
    if from_addr is None:
        return []
    header = autocrypt.sender_header(_values(headers, "Autocrypt"), from_addr)
    return [header.key] if header is not None else []


def _open_signed(
    entity: bytes,
    kind: MailKind,
    peer_keys: Sequence[PublicKey],
    extra_keys: Sequence[PublicKey],
    from_addr: str | None,
) -> OpenedMail:
    """multipart/signed (RFC 3156 §5): the first part, byte for byte, against the signature."""
    signed, signature = signed_parts(entity)
    keys = [*peer_keys, *extra_keys]
    keys += _sender_keys(_headers_of(entity), from_addr)  # outer Autocrypt of a signed mail
    keys += _sender_keys(_headers_of(signed), from_addr)
    return _opened(kind, signed, verify_detached(signed, signature, keys), peer_keys)


_HEADER_END = re.compile(rb"\r?\n\r?\n")


def signed_parts(entity: bytes) -> tuple[bytes, bytes]:
    """(the signed first part in canonical CRLF form, the signature part's content) of a
    multipart/signed entity, cut from the raw bytes: re-serialising a parsed part could change
    a byte and break a good signature."""
    end = _HEADER_END.search(entity)
    if end is None:
        raise MailFormatError("multipart/signed without a body")
    headers = _headers_of(entity[: end.end()])
    if str(headers.get_param("protocol", "")).lower() != "application/pgp-signature":
        raise MailFormatError("multipart/signed without protocol application/pgp-signature")
    boundary = headers.get_boundary()
    if not boundary:
        raise MailFormatError("multipart/signed without a boundary")
    body = entity[end.end() :]
    delimiter = re.compile(
        rb"(?:\A|\r?\n)--"
        + re.escape(boundary.encode("ascii", "replace"))
        + rb"(--)?[ \t]*(?:\r?\n|\Z)"
    )
    marks = list(delimiter.finditer(body))
    if len(marks) < 3 or marks[0].group(1) or marks[1].group(1):
        raise MailFormatError("multipart/signed must have exactly two parts")
    signed = body[marks[0].end() : marks[1].start()]
    signature_entity = body[marks[1].end() : marks[2].start()]
    part = BytesParser(policy=email.policy.default).parsebytes(signature_entity)
    if part.get_content_type() != "application/pgp-signature":
        raise MailFormatError("second part is not application/pgp-signature")
    return re.sub(rb"(?<!\r)\n", b"\r\n", signed), part.get_payload(decode=True) or b""


# The block with the line break that ends its END line: the plaintext brings its own.
_ARMORED = re.compile(
    rb"-----BEGIN PGP MESSAGE-----.*?-----END PGP MESSAGE-----[ \t]*(?:\r?\n)?", re.S
)


def _inline_part(message: Message) -> Message | None:
    """The first text/plain leaf holding an armored message, not looking into attached mail."""
    if message.is_multipart():
        for part in message.iter_parts():
            if part.get_content_maintype() != "message":
                found = _inline_part(part)
                if found is not None:
                    return found
        return None
    if message.get_content_type() == "text/plain":
        payload = message.get_payload(decode=True) or b""
        if b"-----BEGIN PGP MESSAGE-----" in payload:
            return message
    return None


def _open_inline(
    part: Message,
    key: SecretKey,
    peer_keys: Sequence[PublicKey],
    outer: Message,
    from_addr: str | None,
    max_bytes: int,
) -> OpenedMail:
    """Inline PGP: the armored block is decrypted and put back in place in the text; the
    result is a text/plain entity (UTF-8, the charset every inline sender uses today)."""
    text = part.get_payload(decode=True) or b""
    block = _ARMORED.search(text)
    if block is None:
        raise DecryptionError("inline PGP message without its END line")
    keys = [*peer_keys, *_sender_keys(outer, from_addr)]
    decrypted = decrypt(block.group(0), key, verify_with=keys, max_bytes=max_bytes)
    body = text[: block.start()] + decrypted.plaintext + text[block.end() :]
    body = re.sub(rb"(?<!\r)\n", b"\r\n", body)
    entity = (
        b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
    )
    return _opened(MailKind.INLINE, entity, decrypted.verification, peer_keys)


# --- for the inbound pipeline ----------------------------------------------------------------

# Outer headers that keep their outer value even when the inner part repeats them: the
# authenticated sender and the transport trace.
_OUTER_WINS = frozenset(
    {"from", "sender", "return-path", "received", "dkim-signature", "authentication-results"}
    | {"arc-seal", "arc-message-signature", "arc-authentication-results"}
)


def merged_mail(raw: bytes, opened: OpenedMail) -> bytes:
    """One RFC 5322 mail for the existing inbound formatter: the outer header block (the
    authenticated From, the trace) with the protected headers in place of their outer copies
    (the real Subject instead of "[...]"), and the inner body. PLAIN mail comes back as is."""
    if opened.kind is MailKind.PLAIN:
        return bytes(raw)
    outer_fields, _outer_body = _split_fields(bytes(raw))
    inner_fields, inner_body = _split_fields(opened.content)
    inner_names = {_field_name(f) for f in inner_fields}
    kept = [
        f
        for f in outer_fields
        if _field_name(f) in _OUTER_WINS
        or not (
            _field_name(f) in inner_names
            or _field_name(f).startswith("content-")
            or _field_name(f) == "mime-version"
        )
    ]
    inner = [f for f in inner_fields if _field_name(f) not in _OUTER_WINS]
    fields = [*kept, b"MIME-Version: 1.0", *inner]
    return b"\r\n".join(fields) + b"\r\n\r\n" + inner_body


def _split_fields(entity: bytes) -> tuple[list[bytes], bytes]:
    end = _HEADER_END.search(entity)
    block, body = (entity[: end.start()], entity[end.end() :]) if end else (entity, b"")
    block = re.sub(rb"(?<!\r)\n", b"\r\n", block)
    return [f for f in re.split(rb"\r\n(?![ \t])", block) if f.strip()], body


def _field_name(header_field: bytes) -> str:
    return header_field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
