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
