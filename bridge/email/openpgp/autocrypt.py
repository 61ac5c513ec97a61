"""Autocrypt Level 1 (https://autocrypt.org/level1.html): the header, the peer state and its
update rules, and the encryption recommendation. Pure functions over plain data: the caller
loads and stores the state (the shapes are `MailboxKey` and `PeerState` below).

PRECONDITION for everything that learns from incoming mail (`mail_facts`, `update_peer`,
`update_gossip`): the caller only feeds mail whose From address passed the bridge's sender
checks (DKIM/SPF/DMARC alignment). Autocrypt binds a key to the From address and nothing else;
learning from a forged From would let anyone replace a peer's key.

Times are UTC Unix seconds. Addresses are compared and stored lowercased (Autocrypt's
canonical form for Level 1).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import enum
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC
from email.message import Message

from .keys import KeyFormatError, PublicKey, SecretKey

log = logging.getLogger("bridge.email.openpgp.autocrypt")

MUTUAL = "mutual"
NOPREFERENCE = "nopreference"
MAX_HEADER_BYTES = 10 * 1024  # Level 1: never send more, treat more as invalid
STALE_SECONDS = 35 * 24 * 3600  # autocrypt_timestamp this much older than last_seen: discourage
KEYDATA_LINE = 76  # base64 characters per folded line
_KNOWN_ATTRIBUTES = frozenset({"addr", "prefer-encrypt", "keydata"})
# An addr we are willing to write into a header: one mailbox, nothing that could end the
# attribute (";"), fold the header or start another one.
_ADDR = re.compile(r"[^\s;<>@\"]{1,64}@[^\s;<>@\"]{1,255}")


class InvalidHeader(ValueError):
    """An Autocrypt or Autocrypt-Gossip header that Level 1 says to treat as invalid."""


# --- what is stored --------------------------------------------------------------------------


@dataclass(frozen=True)
class MailboxKey:
    """Per mailbox (Autocrypt's `accounts[addr]`): what the lead persists.

    `secret_key` is the unprotected binary secret key: store only
    `bridge.crypto.sealed.seal_bytes(pickle_key, "openpgp-key", secret_key)`."""

    address: str  # lowercased
    fingerprint: str  # uppercase hex, 40 characters (v4)
    created_at: int
    secret_key: bytes = field(repr=False)
    prefer_encrypt: str = MUTUAL

    @classmethod
    def generate(cls, address: str, created_at: int | None = None) -> MailboxKey:
        key = SecretKey.generate(address.lower(), created_at)
        return cls(address.lower(), key.fingerprint, key.created_at, key.to_bytes())

    def key(self) -> SecretKey:
        return SecretKey.from_bytes(self.secret_key)

    def public_key(self) -> PublicKey:
        return self.key().public_key


@dataclass(frozen=True)
class PeerState:
    """Per peer address (Autocrypt's `peers[addr]`), one row per address: what the lead
    persists. Keys are binary transferable public keys as received (public, but bulky: out of
    the repr)."""

    addr: str  # lowercased
    last_seen: int | None = None  # newest effective date of any mail from the peer
    autocrypt_timestamp: int | None = None  # newest effective date of a mail with a header
    public_key: bytes | None = field(default=None, repr=False)
    prefer_encrypt: str = NOPREFERENCE
    gossip_timestamp: int | None = None
    gossip_key: bytes | None = field(default=None, repr=False)


# --- the header ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutocryptHeader:
    addr: str  # lowercased
    keydata: bytes = field(repr=False)  # binary transferable public key
    prefer_encrypt: str = NOPREFERENCE

    @property
    def key(self) -> PublicKey:
        return PublicKey.from_bytes(self.keydata)


class HeaderField(str):
    """A header folded here rather than by the email package: the email package would turn a
    76-character base64 run into RFC 2047 encoded-words. The email policy takes any str with
    `name` and `fold` as a ready header object (as bridge.formatter.to_email does)."""

    name: str
    lines: list[str]

    def __new__(cls, name: str, lines: list[str]) -> HeaderField:
        value = super().__new__(cls, "".join(lines))
        value.name = name
        value.lines = lines
        return value

    def fold(self, *, policy) -> str:  # noqa: ANN001 - email.policy.Policy
        folded = f"{self.name}: {self.lines[0]}"
        for line in self.lines[1:]:
            folded += policy.linesep + " " + line
        return folded + policy.linesep


def build_header(
    addr: str, key: PublicKey, prefer_encrypt: str | None = MUTUAL, *, gossip: bool = False
) -> HeaderField:
    """`Autocrypt:` (or, with gossip, `Autocrypt-Gossip:`, which carries no prefer-encrypt)
    for `addr`, with only the minimal key (primary, the user ID for addr, encryption subkey).
    ValueError for an address that cannot go in a header, or a header above 10 KiB."""
    addr = addr.strip().lower()
    if not _ADDR.fullmatch(addr):
        raise ValueError("address not usable in an Autocrypt header")
    keydata = base64.b64encode(key.minimal(addr).to_bytes()).decode("ascii")
    attributes = f"addr={addr};"
    if prefer_encrypt == MUTUAL and not gossip:
        attributes += " prefer-encrypt=mutual;"
    lines = [attributes + " keydata="]
    lines += [keydata[i : i + KEYDATA_LINE] for i in range(0, len(keydata), KEYDATA_LINE)]
    name = "Autocrypt-Gossip" if gossip else "Autocrypt"
    size = len(name) + 2 + sum(len(line) + 3 for line in lines)
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"Autocrypt header of {size} bytes is above {MAX_HEADER_BYTES}")
    return HeaderField(name, lines)


def parse_header(value: str, *, gossip: bool = False) -> AutocryptHeader:
    """One header value → AutocryptHeader, or InvalidHeader saying why Level 1 rejects it:
    missing addr or keydata, an unknown critical attribute (a name without a leading `_`),
    a repeated attribute, bad base64, above 10 KiB, or a key that does not parse, fails its
    self-signatures or has nothing to encrypt to."""
    if len(value) > MAX_HEADER_BYTES:
        raise InvalidHeader("header above 10 KiB")
    attributes: dict[str, str] = {}
    for item in value.split(";"):
        if not item.strip():
            continue
        name, equals, content = item.partition("=")
        name = name.strip().lower()
        if not equals or not name:
            raise InvalidHeader("attribute without a value")
        if name in attributes:
            raise InvalidHeader(f"repeated attribute {name}")
        if name not in _KNOWN_ATTRIBUTES:
            if name.startswith("_"):
                continue  # non-critical: ignored
            raise InvalidHeader(f"unknown critical attribute {name}")
        attributes[name] = content
    if "addr" not in attributes or "keydata" not in attributes:
        raise InvalidHeader("addr and keydata are required")
    addr = attributes["addr"].strip().lower()
    if not _ADDR.fullmatch(addr):
        raise InvalidHeader("addr is not one address")
    keydata = _decode_keydata(attributes["keydata"])
    try:
        PublicKey.from_bytes(keydata).encryption_subkey_fingerprint  # noqa: B018 - validates
    except KeyFormatError as error:
        raise InvalidHeader(f"keydata: {error}") from None
    prefer = attributes.get("prefer-encrypt", "").strip().lower()
    prefer_encrypt = MUTUAL if prefer == MUTUAL and not gossip else NOPREFERENCE
    return AutocryptHeader(addr, keydata, prefer_encrypt)


def _decode_keydata(text: str) -> bytes:
    compact = "".join(text.split())
    try:
        keydata = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidHeader("keydata is not base64") from None
    if not keydata:
        raise InvalidHeader("keydata is empty")
    return keydata


def _valid_headers(values: Iterable[str], *, gossip: bool) -> list[AutocryptHeader]:
    valid = []
    for value in values:
        try:
            valid.append(parse_header(str(value), gossip=gossip))
        except InvalidHeader as error:
            log.debug("ignoring an Autocrypt%s header: %s", "-Gossip" if gossip else "", error)
    return valid


# --- what one incoming mail says -------------------------------------------------------------


@dataclass(frozen=True)
class MailFacts:
    """The parts of one received mail that the Level 1 rules read."""

    from_addr: str | None  # lowercased; None when From names no address or more than one
    date: int | None  # the Date header, None when missing or unparseable
    autocrypt: tuple[str, ...] = ()  # every Autocrypt header value
    gossip: tuple[str, ...] = ()  # every Autocrypt-Gossip header value (encrypted part only)
    recipients: frozenset[str] = frozenset()  # To, Cc and Reply-To addresses, lowercased
    ignore_reason: str | None = None  # set when Level 1 says not to update peers[from] at all


def mail_facts(
    outer: Message,
    protected: Message | None = None,
    *,
    gossip_allowed: bool = False,
) -> MailFacts:
    """MailFacts from a parsed mail. `protected` is the decrypted payload's root part (its
    protected headers): when given, its Autocrypt headers are read instead of the outer ones
    (the inner copy is the one under the signature; a sender writing both must not count as
    two headers). Gossip is read only from `protected`, and only when `gossip_allowed` — pass
    it for mail that was encrypted and whose signature verified."""
    from_addrs = [a for _n, a in email.utils.getaddresses(_all(outer, "From")) if a]
    from_addr = from_addrs[0].lower() if len(from_addrs) == 1 else None
    source = protected if protected is not None and _all(protected, "Autocrypt") else outer
    gossip: tuple[str, ...] = ()
    if protected is not None and gossip_allowed:
        gossip = tuple(_all(protected, "Autocrypt-Gossip"))
    heads = protected if protected is not None else outer
    recipients = frozenset(
        address.lower()
        for _n, address in email.utils.getaddresses(
            _all(heads, "To") + _all(heads, "Cc") + _all(heads, "Reply-To")
        )
        if address
    )
    return MailFacts(
        from_addr=from_addr,
        date=_date(outer.get("Date")),
        autocrypt=tuple(_all(source, "Autocrypt")),
        gossip=gossip,
        recipients=recipients,
        ignore_reason=_ignore_reason(outer, len(from_addrs)),
    )


def _all(message: Message, name: str) -> list[str]:
    return [str(value) for value in message.get_all(name, [])]


def _date(value: object) -> int | None:
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # "-0000": UTC, by RFC 5322's reading
        return int(parsed.replace(tzinfo=UTC).timestamp())
    return int(parsed.timestamp())


def _ignore_reason(outer: Message, from_count: int) -> str | None:
    if str(outer.get("Auto-Submitted", "")).strip().lower().startswith("auto-replied"):
        return "auto-replied"
    if outer.get_content_type() == "multipart/report":
        return "multipart/report"
    if from_count != 1:
        return "From does not name exactly one address"
    return None


def effective_date(date: int | None, now: int) -> int:
    """The Date header, or the time of receipt when it is missing or in the future."""
    return now if date is None or date > now else date


# --- the update rules ------------------------------------------------------------------------


def update_peer(state: PeerState | None, facts: MailFacts, now: int) -> PeerState | None:
    """Level 1 §"Updating Autocrypt Peer State" for the sender of one mail. Returns the new
    state of peers[from-addr] (or `state` unchanged when the mail is ignored, None if there
    was no state and nothing to record). Header validity: exactly one valid Autocrypt header
    whose addr equals From (a header naming another address is invalid); several valid headers
    count as none."""
    if facts.ignore_reason or facts.from_addr is None:
        return state
    if state is not None and state.addr != facts.from_addr:
        raise ValueError("state belongs to another address")
    current = state or PeerState(addr=facts.from_addr)
    when = effective_date(facts.date, now)
    if current.autocrypt_timestamp is not None and when < current.autocrypt_timestamp:
        return state  # older than the header we already have
    if current.last_seen is None or when > current.last_seen:
        current = replace(current, last_seen=when)
    header = _single_header(facts)
    if header is None:
        return current
    return replace(
        current,
        autocrypt_timestamp=when,
        public_key=header.keydata,
        prefer_encrypt=header.prefer_encrypt,
    )


def _single_header(facts: MailFacts) -> AutocryptHeader | None:
    if facts.from_addr is None:
        return None
    return sender_header(facts.autocrypt, facts.from_addr)


def sender_header(values: Iterable[str], from_addr: str) -> AutocryptHeader | None:
    """The single valid Autocrypt header among `values` for `from_addr`, or None (none, or
    several: Level 1 discards them all)."""
    # A header whose addr is not the From address is invalid (Level 1), so only those count.
    valid = [
        header
        for header in _valid_headers(values, gossip=False)
        if header.addr == from_addr.lower()
    ]
    if len(valid) != 1:
        if valid:
            log.debug("%d valid Autocrypt headers: all ignored", len(valid))
        return None
    return valid[0]


def update_gossip(
    states: Mapping[str, PeerState], facts: MailFacts, now: int
) -> dict[str, PeerState]:
    """Level 1 §"Updating Autocrypt Peer State from Key Gossip". `states` holds the known
    peers among the gossiped addresses; returns the peers whose state changed (gossip fields
    only). A gossiped address must be in To, Cc or Reply-To; gossip about the sender itself is
    ignored (its own Autocrypt header speaks for it), and an address gossiped twice in one
    mail is ignored (which one would be meant?)."""
    if facts.ignore_reason or not facts.gossip:
        return {}
    when = effective_date(facts.date, now)
    headers = _valid_headers(facts.gossip, gossip=True)
    counts: dict[str, int] = {}
    for header in headers:
        counts[header.addr] = counts.get(header.addr, 0) + 1
    changed: dict[str, PeerState] = {}
    for header in headers:
        addr = header.addr
        if counts[addr] > 1 or addr not in facts.recipients or addr == facts.from_addr:
            continue
        current = states.get(addr) or PeerState(addr=addr)
        if current.gossip_timestamp is not None and current.gossip_timestamp > when:
            continue
        changed[addr] = replace(current, gossip_timestamp=when, gossip_key=header.keydata)
    return changed


# --- the recommendation ----------------------------------------------------------------------


class Recommendation(enum.Enum):
    DISABLE = "disable"
    DISCOURAGE = "discourage"
    AVAILABLE = "available"
    ENCRYPT = "encrypt"


@dataclass(frozen=True)
class Advice:
    recommendation: Recommendation
    target_keys: dict[str, bytes] = field(default_factory=dict, repr=False)  # addr → key


def _usable(keydata: bytes | None) -> bytes | None:
    """The key, or None when it is revoked, expired or otherwise cannot be encrypted to."""
    if keydata is None:
        return None
    try:
        PublicKey.from_bytes(keydata).encryption_subkey_fingerprint  # noqa: B018
    except KeyFormatError:
        return None
    return keydata


def recommend(
    peer: PeerState | None,
    *,
    own_prefer_encrypt: str = MUTUAL,
    reply_to_encrypted: bool = False,
) -> Advice:
    """Level 1 recommendation for one recipient."""
    if peer is None:
        return Advice(Recommendation.DISABLE)
    public_key, gossip_key = _usable(peer.public_key), _usable(peer.gossip_key)
    if public_key is None and gossip_key is None:
        return Advice(Recommendation.DISABLE)
    if public_key is None:
        target, preliminary = gossip_key, Recommendation.DISCOURAGE
    else:
        target, preliminary = public_key, Recommendation.AVAILABLE
        seen, stamp = peer.last_seen, peer.autocrypt_timestamp
        if seen is not None and stamp is not None and seen - stamp > STALE_SECONDS:
            preliminary = Recommendation.DISCOURAGE
    keys = {peer.addr: target} if target is not None else {}
    if reply_to_encrypted:
        return Advice(Recommendation.ENCRYPT, keys)
    mutual = peer.prefer_encrypt == MUTUAL and own_prefer_encrypt == MUTUAL
    if preliminary is Recommendation.AVAILABLE and mutual:
        return Advice(Recommendation.ENCRYPT, keys)
    return Advice(preliminary, keys)


def recommend_all(
    peers: Mapping[str, PeerState | None] | Sequence[PeerState | None],
    *,
    own_prefer_encrypt: str = MUTUAL,
    reply_to_encrypted: bool = False,
) -> Advice:
    """Level 1 recommendation for a mail to several recipients (To and Cc: every address the
    mail is encrypted to, Bcc included, since each must be able to read it)."""
    items = list(peers.values()) if isinstance(peers, Mapping) else list(peers)
    if not items:
        return Advice(Recommendation.DISABLE)
    advices = [
        recommend(p, own_prefer_encrypt=own_prefer_encrypt, reply_to_encrypted=reply_to_encrypted)
        for p in items
    ]
    keys: dict[str, bytes] = {}
    for advice in advices:
        keys.update(advice.target_keys)
    found = {advice.recommendation for advice in advices}
    if Recommendation.DISABLE in found:
        return Advice(Recommendation.DISABLE, keys)
    if found == {Recommendation.ENCRYPT}:
        return Advice(Recommendation.ENCRYPT, keys)
    if Recommendation.DISCOURAGE in found:
        return Advice(Recommendation.DISCOURAGE, keys)
    return Advice(Recommendation.AVAILABLE, keys)
