"""Mapping between email addresses and Matrix user IDs, in both directions. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Characters a Matrix localpart may hold as they are (the spec's historical grammar minus the
# escape characters themselves).
_LOCALPART_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-./+")
_MATRIX_LOCALPART = re.compile(r"^[a-z0-9._=/+-]+$")


def encode_localpart(value: str) -> str:
    """Escape any string into a valid localpart, as the Matrix spec's appendix (and mautrix) do.

    Upper case becomes ``_`` + lower case, ``_`` becomes ``__``, and every other byte outside
    the safe set (including ``=``) becomes ``=xx``: ``Bob@Example.com`` → ``_bob=40_example.com``.
    """
    out = []
    for byte in value.encode("utf-8"):
        if byte in _LOCALPART_SAFE:
            out.append(chr(byte))
        elif ord("A") <= byte <= ord("Z"):
            out.append("_" + chr(byte + 32))
        elif byte == ord("_"):
            out.append("__")
        else:
            out.append(f"={byte:02x}")
    return "".join(out)


def normalize_address(address: str) -> str:
    """The canonical form the bridge keys ghosts and portals by: lower case, trimmed."""
    return address.strip().lower()


def ghost_localpart(template: str, address: str) -> str:
    return template.replace("{address}", encode_localpart(normalize_address(address)))


def ghost_mxid(template: str, address: str, domain: str) -> str:
    return f"@{ghost_localpart(template, address)}:{domain}"


@dataclass(frozen=True)
class Mailbox:
    """A local recipient: the Matrix user an address belongs to, and its +tag."""

    localpart: str
    tag: str


def parse_local_mailbox(local_part: str) -> Mailbox | None:
    """``Alice+news`` → Mailbox("alice", "news"); None when no Matrix localpart can match."""
    base, _, tag = local_part.partition("+")
    base = base.lower()
    if not base or not _MATRIX_LOCALPART.match(base):
        return None
    return Mailbox(base, tag)


def decode_localpart(localpart: str) -> str | None:
    """The inverse of encode_localpart; None when the string is not a valid encoding."""
    out = bytearray()
    i = 0
    try:
        while i < len(localpart):
            char = localpart[i]
            if char == "_":
                nxt = localpart[i + 1]
                out += b"_" if nxt == "_" else nxt.upper().encode()
                i += 2
            elif char == "=":
                out.append(int(localpart[i + 1 : i + 3], 16))
                i += 3
            else:
                out += char.encode()
                i += 1
        return out.decode("utf-8")
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def ghost_address(template: str, user_id: str, domain: str) -> str | None:
    """The email address a ghost MXID stands for, or None if it is not one of our ghosts."""
    prefix, _, suffix = template.partition("{address}")
    localpart, _, server = user_id.removeprefix("@").partition(":")
    if server != domain or not localpart.startswith(prefix) or not localpart.endswith(suffix):
        return None
    inner = localpart[len(prefix) : len(localpart) - len(suffix) if suffix else None]
    address = decode_localpart(inner)
    if not address or address.count("@") != 1:
        return None
    return normalize_address(address)


def is_ghost(template: str, user_id: str, domain: str) -> bool:
    """Whether user_id lies in our exclusive ghost namespace (what the registration claims),
    whether or not its localpart decodes to an address."""
    prefix, _, suffix = template.partition("{address}")
    localpart, _, server = user_id.removeprefix("@").partition(":")
    return (
        server == domain
        and len(localpart) > len(prefix) + len(suffix)
        and localpart.startswith(prefix)
        and localpart.endswith(suffix)
    )
