"""Mapping between email addresses and Matrix user IDs, in both directions. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass

# Characters a Matrix localpart may hold as they are (the spec's historical grammar minus the
# escape characters themselves).
_LOCALPART_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-./+")

# The local part of a local user's mailbox, and the Matrix localpart behind it: the two are the
# same string. Lower case only (mail to ``Alice@`` reaches the mailbox of ``@alice``), no "+"
# (it separates the +tag), a dot-atom (no leading, trailing or double dot), at most 64
# characters (RFC 5321 section 4.5.3.1.1). A Matrix ID outside this grammar has no mailbox: it
# can neither receive nor send, so no address can ever stand for two users.
_MAILBOX_LOCALPART = re.compile(r"[a-z0-9_=/-]+(?:\.[a-z0-9_=/-]+)*")
MAX_MAILBOX_LOCALPART = 64


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


def is_local_address(address: str, email_domain: str) -> bool:
    """Whether an email address is one of this bridge's mailboxes (its domain is ours).

    The address-side counterpart of "ours": a local user's mailbox, never a correspondent.
    """
    return normalize_address(address).rpartition("@")[2] == email_domain.strip().lower()


def ghost_localpart(template: str, address: str) -> str:
    return template.replace("{address}", encode_localpart(normalize_address(address)))


def ghost_mxid(template: str, address: str, domain: str) -> str:
    return f"@{ghost_localpart(template, address)}:{domain}"


@dataclass(frozen=True)
class Mailbox:
    """A local recipient: the Matrix user an address belongs to, and its +tag."""

    localpart: str
    tag: str

    def user_id(self, homeserver_domain: str) -> str:
        return f"@{self.localpart}:{homeserver_domain}"


def parse_local_mailbox(local_part: str) -> Mailbox | None:
    """``Alice+news`` → Mailbox("alice", "news"): the localpart of the user an address's local
    part delivers to, and its +tag. None when it is no user's mailbox. The inverse of
    `local_mailbox_address`: the one definition both directions use."""
    base, _, tag = local_part.partition("+")
    base = base.lower()
    if len(base) > MAX_MAILBOX_LOCALPART or not _MAILBOX_LOCALPART.fullmatch(base):
        return None
    return Mailbox(base, tag)


def local_mailbox_address(user_id: str, homeserver_domain: str, email_domain: str) -> str | None:
    """The mailbox address of a local user: ``@alice:hs`` → ``alice@<email_domain>``. None when
    the user has none: a user of another server (their localpart would be a local user's
    mailbox), or a localpart that `parse_local_mailbox` would read as someone else's (a "+",
    upper case, characters or dots a dot-atom cannot carry)."""
    if not user_id.startswith("@"):
        return None
    localpart, _, server = user_id[1:].partition(":")
    if server != homeserver_domain or parse_local_mailbox(localpart) != Mailbox(localpart, ""):
        return None
    return f"{localpart}@{email_domain.lower()}"


def mailbox_refusal(user_id: str, homeserver_domain: str) -> str:
    """Why `local_mailbox_address` has no address for user_id, in words for its owner."""
    localpart, _, server = user_id.removeprefix("@").partition(":")
    if server != homeserver_domain:
        return f"{user_id} is not an account of {homeserver_domain}"
    if "+" in localpart:
        return f"the “+” in {user_id} separates a tag in email addresses"
    if localpart != localpart.lower():
        return f"email addresses do not tell upper from lower case, as {user_id} does"
    if len(localpart) > MAX_MAILBOX_LOCALPART:
        return f"{user_id} is longer than an email address may be"
    return f"{user_id} has characters or dots an email address cannot carry"


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


@dataclass(frozen=True)
class OurUsers:
    """Who is ours: the bot and every user of our exclusive ghost namespace. The bridge never
    reacts to their events, never encrypts for them, never greets them. The one definition,
    handed to everything that asks."""

    bot: str
    template: str
    domain: str

    def __call__(self, user_id: str) -> bool:
        return user_id == self.bot or is_ghost(self.template, user_id, self.domain)


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
