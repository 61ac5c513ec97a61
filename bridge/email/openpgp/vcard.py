"""A vCard 4.0 carrying a mailbox's address and public key, in the form Delta Chat writes and
reads (its `make_vcard` / `import_vcard`): sharing the card is how a Delta Chat user starts an
encrypted chat with a bridged mailbox before any mail was exchanged.

The KEY line must be `KEY:data:application/pgp-keys;base64\\,<base64>`: the comma escaped,
the line not folded. Written `base64,` Delta Chat's import silently returns nothing.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .keys import KeyFormatError, PublicKey

_KEY_PREFIXES = ("data:application/pgp-keys;base64\\,", "data:application/pgp-keys;base64,")
MAX_VCARD_CHARS = 64 * 1024


def _escape(text: str) -> str:
    """RFC 6350 §3.4 text escaping, and no line break survives (one property, one line)."""
    text = text.replace("\\", "\\\\").replace(",", "\\,").replace(";", "\\;")
    return re.sub(r"\r\n|\r|\n", "\\\\n", text)


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) in "nN" else m.group(1), text)


def make_vcard(
    address: str, key: PublicKey, display_name: str | None = None, updated: int | None = None
) -> str:
    """The card (CRLF lines): EMAIL, FN (the address when there is no name), KEY (the minimal
    Autocrypt key), REV. The name is untrusted text: escaped, control characters and line
    breaks turned into single spaces."""
    printable = "".join(c if c.isprintable() else " " for c in display_name or "")
    name = " ".join(printable.split()) or address
    keydata = base64.b64encode(key.minimal(address).to_bytes()).decode("ascii")
    lines = [
        "BEGIN:VCARD",
        "VERSION:4.0",
        f"EMAIL:{_escape(address)}",
        f"FN:{_escape(name)}",
        f"KEY:{_KEY_PREFIXES[0]}{keydata}",
    ]
    if updated is not None:
        lines.append("REV:" + datetime.fromtimestamp(updated, UTC).strftime("%Y%m%dT%H%M%SZ"))
    lines.append("END:VCARD")
    return "\r\n".join(lines) + "\r\n"


@dataclass(frozen=True)
class VcardContact:
    address: str
    display_name: str
    key: bytes | None = field(default=None, repr=False)  # binary public key, when valid


def parse_vcard(text: str) -> list[VcardContact]:
    """Every card with an EMAIL in `text`. A KEY that is not a usable OpenPGP public key is
    dropped (the contact is kept without it). ValueError above MAX_VCARD_CHARS."""
    if len(text) > MAX_VCARD_CHARS:
        raise ValueError("vCard too large")
    unfolded = re.sub(r"\r?\n[ \t]", "", text)  # RFC 6350 §3.2 line folding
    contacts: list[VcardContact] = []
    card: dict[str, str] | None = None
    for line in unfolded.splitlines():
        name, _, content = line.partition(":")
        prop = name.split(";", 1)[0].strip().upper()
        if prop == "BEGIN" and content.strip().upper() == "VCARD":
            card = {}
        elif prop == "END" and card is not None:
            if card.get("EMAIL"):
                contacts.append(_contact(card))
            card = None
        elif card is not None and prop and prop not in card:
            card[prop] = content
    return contacts


def _contact(card: dict[str, str]) -> VcardContact:
    address = _unescape(card["EMAIL"]).strip()
    key = None
    raw = card.get("KEY", "").strip()
    for prefix in _KEY_PREFIXES:
        if raw.startswith(prefix):
            try:
                data = base64.b64decode("".join(raw[len(prefix) :].split()), validate=True)
                PublicKey.from_bytes(data)
                key = data
            except (binascii.Error, ValueError, KeyFormatError):
                key = None
            break
    return VcardContact(address, _unescape(card.get("FN", "")).strip() or address, key)
