"""Autocrypt Level 1: the header format and the peer-state and recommendation rules, as tables
(https://autocrypt.org/level1.html, "Updating Autocrypt Peer State" and "Provide a
recommendation"). Pure: no gpg, no I/O."""

from __future__ import annotations

import base64
import email.policy
from dataclasses import replace
from email.message import EmailMessage
from email.parser import BytesParser

import pytest

from bridge.email.openpgp import autocrypt
from bridge.email.openpgp.autocrypt import (
    MUTUAL,
    NOPREFERENCE,
    STALE_SECONDS,
    InvalidHeader,
    MailboxKey,
    MailFacts,
    PeerState,
    Recommendation,
    build_header,
    mail_facts,
    parse_header,
    recommend,
    recommend_all,
    update_gossip,
    update_peer,
)
from bridge.email.openpgp.keys import PublicKey, SecretKey

NOW = 1_800_000_000
DAY = 86400
BOB = "bob@example.net"


@pytest.fixture(scope="module")
def bob_key() -> SecretKey:
    return SecretKey.generate(BOB)


@pytest.fixture(scope="module")
def bob_new_key() -> SecretKey:
    return SecretKey.generate(BOB)


@pytest.fixture(scope="module")
def keydata(bob_key: SecretKey) -> str:
    return base64.b64encode(bob_key.public_key.to_bytes()).decode()


def value(header: autocrypt.HeaderField) -> str:
    """What a receiving MUA reads: the header unfolded."""
    return "".join(header.lines)


# --- building --------------------------------------------------------------------------------


def test_built_header_is_level1_shaped(bob_key: SecretKey) -> None:
    header = build_header("Bob@Example.NET", bob_key.public_key)
    assert header.name == "Autocrypt"
    assert header.lines[0] == f"addr={BOB}; prefer-encrypt=mutual; keydata="
    assert all(len(line) <= autocrypt.KEYDATA_LINE for line in header.lines[1:])
    folded = header.fold(policy=email.policy.SMTP)
    assert all(len(line) <= 78 for line in folded.split("\r\n"))
    parsed = parse_header(value(header))
    assert (parsed.addr, parsed.prefer_encrypt) == (BOB, MUTUAL)
    assert parsed.key.fingerprint == bob_key.fingerprint


def test_keydata_is_the_minimal_five_packets(bob_key: SecretKey) -> None:
    from openpgp.packet import Packet

    keydata = parse_header(value(build_header(BOB, bob_key.public_key))).keydata
    kinds = [p.kind for p in Packet.from_bytes_many(keydata)]
    assert kinds == ["public-key", "user-id", "signature", "public-subkey", "signature"]


def test_minimal_key_drops_extra_user_ids_and_keeps_the_one_for_addr() -> None:
    from openpgp.composed import (
        EncryptionCaps,
        KeyType,
        SecretKeyParamsBuilder,
        SubkeyParamsBuilder,
    )

    sub = (
        SubkeyParamsBuilder()
        .version(4)
        .key_type(KeyType.ecdh("curve25519"))
        .can_encrypt(EncryptionCaps.communication())
        .build()
    )
    native = (
        SecretKeyParamsBuilder()
        .version(4)
        .key_type(KeyType.ed25519_legacy())
        .can_sign(True)
        .can_certify(True)
        .primary_user_id("Bob Work <bob@work.example>")
        .user_id(f"Bob <{BOB}>")
        .subkey(sub)
        .generate()
    )
    key = PublicKey(native.to_public_key())
    assert len(key.user_ids) == 2
    minimal = key.minimal(BOB)
    assert minimal.user_ids == [f"Bob <{BOB}>"]
    assert minimal.fingerprint == key.fingerprint
    assert minimal.encryption_subkey_fingerprint == key.encryption_subkey_fingerprint


def test_gossip_header_has_no_prefer_encrypt(bob_key: SecretKey) -> None:
    header = build_header(BOB, bob_key.public_key, gossip=True)
    assert header.name == "Autocrypt-Gossip"
    assert "prefer-encrypt" not in header.lines[0]
    assert parse_header(value(header), gossip=True).prefer_encrypt == NOPREFERENCE


def test_nopreference_header_omits_the_attribute(bob_key: SecretKey) -> None:
    header = build_header(BOB, bob_key.public_key, NOPREFERENCE)
    assert header.lines[0] == f"addr={BOB}; keydata="


@pytest.mark.parametrize("addr", ["", "bob", "a;b@example.net", "bob@example.net\r\nX: y", "<b@x>"])
def test_build_refuses_addresses_that_do_not_fit(bob_key: SecretKey, addr: str) -> None:
    with pytest.raises(ValueError):
        build_header(addr, bob_key.public_key)


def test_header_written_through_the_email_package_stays_as_built(bob_key: SecretKey) -> None:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = BOB
    msg["Autocrypt"] = build_header(BOB, bob_key.public_key)
    raw = msg.as_bytes()
    assert b"=?" not in raw  # no RFC 2047 encoded-words in the keydata
    parsed = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert parse_header(str(parsed["Autocrypt"])).key.fingerprint == bob_key.fingerprint


# --- parsing: what Level 1 treats as invalid -------------------------------------------------


@pytest.mark.parametrize(
    ("template", "valid"),
    [
        ("addr={addr}; keydata={key}", True),
        ("addr={addr}; prefer-encrypt=mutual; keydata={key}", True),
        ("  addr = {addr} ;  keydata = {key} ", True),
        ("addr={addr}; _extra=ignored; keydata={key}", True),  # non-critical: ignored
        ("addr={addr}; _x=1; _y=2; keydata={key}", True),
        ("addr={addr}; critical=1; keydata={key}", False),  # unknown critical attribute
        ("addr={addr}; type=1; keydata={key}", False),  # pre-Level-1 attribute: critical
        ("keydata={key}", False),  # no addr
        ("addr={addr}", False),  # no keydata
        ("addr={addr}; addr={addr}; keydata={key}", False),  # repeated attribute
        ("addr={addr}; keydata=not!base64", False),
        ("addr={addr}; keydata=", False),
        ("addr={addr}; keydata=AAAA", False),  # base64, but no key
        ("addr=bob; keydata={key}", False),  # not an address
        ("addr={addr}; novalue; keydata={key}", False),
        ("addr={addr}; keydata={key}; _pad=" + "x" * 11000, False),  # above 10 KiB
    ],
)
def test_header_validity(keydata: str, template: str, valid: bool) -> None:
    text = template.format(addr=BOB, key=keydata)
    if valid:
        assert parse_header(text).addr == BOB
    else:
        with pytest.raises(InvalidHeader):
            parse_header(text)


@pytest.mark.parametrize(
    ("prefer", "expected"),
    [("mutual", MUTUAL), ("MUTUAL", MUTUAL), ("nopreference", NOPREFERENCE), ("yes", NOPREFERENCE)],
)
def test_prefer_encrypt_other_values_mean_nopreference(
    keydata: str, prefer: str, expected: str
) -> None:
    header = parse_header(f"addr={BOB}; prefer-encrypt={prefer}; keydata={keydata}")
    assert header.prefer_encrypt == expected


def test_folded_keydata_parses(keydata: str) -> None:
    folded = "\r\n ".join(keydata[i : i + 40] for i in range(0, len(keydata), 40))
    assert parse_header(f"addr={BOB}; keydata=\r\n {folded}").addr == BOB


# --- the update rules ------------------------------------------------------------------------


def facts(headers: tuple[str, ...] = (), date: int | None = NOW, **kw) -> MailFacts:
    return MailFacts(from_addr=kw.pop("from_addr", BOB), date=date, autocrypt=headers, **kw)


def header_for(key: SecretKey, addr: str = BOB, prefer: str = MUTUAL) -> str:
    return value(build_header(addr, key.public_key, prefer))


def test_first_mail_with_header_creates_the_peer(bob_key: SecretKey) -> None:
    state = update_peer(None, facts((header_for(bob_key),), date=NOW - 10), NOW)
    assert state is not None
    assert (state.addr, state.last_seen, state.autocrypt_timestamp) == (BOB, NOW - 10, NOW - 10)
    assert state.prefer_encrypt == MUTUAL
    assert PublicKey.from_bytes(state.public_key).fingerprint == bob_key.fingerprint


@pytest.mark.parametrize(
    ("date", "effective"),
    [(NOW - 100, NOW - 100), (NOW + 3600, NOW), (None, NOW)],  # the future and no Date: now
)
def test_effective_date_is_min_of_date_and_now(
    bob_key: SecretKey, date: int | None, effective: int
) -> None:
    state = update_peer(None, facts((header_for(bob_key),), date=date), NOW)
    assert state.last_seen == state.autocrypt_timestamp == effective


def known(bob_key: SecretKey, **changes) -> PeerState:
    base = PeerState(
        addr=BOB,
        last_seen=NOW - 10 * DAY,
        autocrypt_timestamp=NOW - 10 * DAY,
        public_key=bob_key.public_key.to_bytes(),
        prefer_encrypt=MUTUAL,
    )
    return replace(base, **changes)


# (case, mail date relative to NOW, header from: "old" key / "new" key / None, expected state)
UPDATE_TABLE = [
    ("newer mail with new key: replaces", -DAY, "new", dict(key="new", ts=-DAY, seen=-DAY)),
    ("newer mail, no header: last_seen only", -DAY, None, dict(key="old", ts=-10 * DAY, seen=-DAY)),
    ("older than autocrypt_timestamp: ignored", -20 * DAY, "new", None),
    ("older, no header: ignored", -20 * DAY, None, None),
    ("same date as the header: applies", -10 * DAY, "new", dict(key="new", ts=-10 * DAY)),
]


@pytest.mark.parametrize(("case", "offset", "which", "expected"), UPDATE_TABLE)
def test_update_table(
    bob_key: SecretKey, bob_new_key: SecretKey, case: str, offset: int, which, expected
) -> None:
    before = known(bob_key)
    keys = {"old": bob_key, "new": bob_new_key}
    headers = (header_for(keys[which], prefer=NOPREFERENCE),) if which else ()
    after = update_peer(before, facts(headers, date=NOW + offset), NOW)
    if expected is None:
        assert after == before, case
        return
    assert PublicKey.from_bytes(after.public_key) == keys[expected["key"]].public_key, case
    assert after.autocrypt_timestamp == NOW + expected["ts"], case
    assert after.last_seen == NOW + expected.get("seen", -10 * DAY), case
    if which:
        assert after.prefer_encrypt == NOPREFERENCE, case  # taken from the new header


def test_older_mail_than_last_seen_but_newer_than_header_updates_the_key(
    bob_key: SecretKey, bob_new_key: SecretKey
) -> None:
    """Level 1 step 1 compares with autocrypt_timestamp, not last_seen: a delayed mail with a
    header, newer than the last header but older than the last plain mail, still counts (and
    leaves last_seen alone)."""
    before = known(bob_key, last_seen=NOW - DAY)
    after = update_peer(before, facts((header_for(bob_new_key),), date=NOW - 5 * DAY), NOW)
    assert PublicKey.from_bytes(after.public_key) == bob_new_key.public_key
    assert (after.autocrypt_timestamp, after.last_seen) == (NOW - 5 * DAY, NOW - DAY)


@pytest.mark.parametrize(
    ("case", "headers", "from_addr"),
    [
        ("addr differs from From", lambda k, n: (header_for(n, "other@example.net"),), BOB),
        ("two valid headers: all ignored", lambda k, n: (header_for(n), header_for(n)), BOB),
        ("critical attribute", lambda k, n: (header_for(n).replace("addr=", "x=1; addr="),), BOB),
        ("garbage", lambda k, n: ("addr=bob@example.net; keydata=AAAA",), BOB),
    ],
)
def test_unusable_headers_count_as_no_header(
    bob_key: SecretKey, bob_new_key: SecretKey, case: str, headers, from_addr: str
) -> None:
    before = known(bob_key)
    after = update_peer(before, facts(headers(bob_key, bob_new_key), date=NOW - DAY), NOW)
    assert after == replace(before, last_seen=NOW - DAY), case


def test_addr_matches_from_case_insensitively(bob_new_key: SecretKey) -> None:
    header = header_for(bob_new_key).replace(f"addr={BOB}", "addr=Bob@EXAMPLE.net")
    state = update_peer(None, facts((header,), from_addr=BOB), NOW)
    assert PublicKey.from_bytes(state.public_key) == bob_new_key.public_key


def test_one_valid_header_among_invalid_ones_counts(bob_new_key: SecretKey) -> None:
    headers = (header_for(bob_new_key), "addr=bob@example.net; critical=1; keydata=AAAA")
    assert update_peer(None, facts(headers), NOW).public_key is not None


@pytest.mark.parametrize("reason", ["auto-replied", "multipart/report", "two From addresses"])
def test_ignored_mail_changes_nothing(bob_key: SecretKey, bob_new_key: SecretKey, reason) -> None:
    before = known(bob_key)
    mail = facts((header_for(bob_new_key),), date=NOW - DAY, ignore_reason=reason)
    assert update_peer(before, mail, NOW) == before
    assert update_peer(None, mail, NOW) is None


def test_state_of_another_address_is_refused(bob_key: SecretKey) -> None:
    with pytest.raises(ValueError):
        update_peer(known(bob_key), facts(from_addr="carol@example.com"), NOW)


# --- facts from a parsed mail ----------------------------------------------------------------


def parsed(headers: list[tuple[str, str]], content_type: str = "text/plain") -> EmailMessage:
    lines = [f"{name}: {text}" for name, text in headers]
    lines.append(f"Content-Type: {content_type}; boundary=b")
    raw = ("\r\n".join(lines) + "\r\n\r\nbody\r\n").encode()
    return BytesParser(policy=email.policy.default).parsebytes(raw)


@pytest.mark.parametrize(
    ("headers", "content_type", "reason"),
    [
        ([("From", BOB)], "text/plain", None),
        ([("From", BOB), ("Auto-Submitted", "auto-replied")], "text/plain", "auto-replied"),
        ([("From", BOB), ("Auto-Submitted", "auto-generated")], "text/plain", None),
        ([("From", BOB)], "multipart/report", "multipart/report"),
        ([("From", f"{BOB}, carol@example.com")], "text/plain", "From"),
        ([("To", BOB)], "text/plain", "From"),
    ],
)
def test_mail_facts_ignore_reasons(headers, content_type: str, reason: str | None) -> None:
    got = mail_facts(parsed(headers, content_type)).ignore_reason
    assert (got is None) if reason is None else (reason in got)


def test_mail_facts_prefers_protected_autocrypt(bob_key: SecretKey, bob_new_key: SecretKey) -> None:
    outer = parsed([("From", BOB), ("Date", "Sat, 01 Jan 2028 00:00:00 +0000")])
    outer["Autocrypt"] = header_for(bob_key)
    inner = parsed([("To", "alice@example.org, carol@example.com")])
    inner["Autocrypt"] = header_for(bob_new_key)
    inner["Autocrypt-Gossip"] = "addr=carol@example.com; keydata=AAAA"
    got = mail_facts(outer, inner, gossip_allowed=True)
    assert got.autocrypt == (header_for(bob_new_key),)  # the inner copy, once
    assert got.date == 1830297600
    assert got.recipients == {"alice@example.org", "carol@example.com"}
    assert len(got.gossip) == 1
    assert mail_facts(outer, inner).gossip == ()  # not allowed: not read
    assert mail_facts(outer).autocrypt == (header_for(bob_key),)  # plain mail: outer


def test_mail_facts_without_inner_autocrypt_falls_back_to_outer(bob_key: SecretKey) -> None:
    outer = parsed([("From", BOB)])
    outer["Autocrypt"] = header_for(bob_key)
    assert mail_facts(outer, parsed([("Subject", "x")])).autocrypt == (header_for(bob_key),)


@pytest.mark.parametrize("date", ["not a date", "Mon, 99 Foo 2026 25:61:00 +0000"])
def test_unparseable_date_is_no_date(date: str) -> None:
    assert mail_facts(parsed([("From", BOB), ("Date", date)])).date is None


# --- gossip ----------------------------------------------------------------------------------

CAROL = "carol@example.com"


def gossip_facts(*headers: str, recipients=(CAROL, BOB), date: int = NOW - DAY) -> MailFacts:
    return MailFacts(
        from_addr="alice@example.org",
        date=date,
        gossip=headers,
        recipients=frozenset(recipients),
    )


def gossip_for(key: SecretKey, addr: str = CAROL) -> str:
    return value(build_header(addr, key.public_key, gossip=True))


def test_gossip_sets_only_gossip_fields(bob_key: SecretKey) -> None:
    carol = PeerState(addr=CAROL, last_seen=NOW - 50 * DAY, prefer_encrypt=MUTUAL)
    changed = update_gossip({CAROL: carol}, gossip_facts(gossip_for(bob_key)), NOW)
    assert set(changed) == {CAROL}
    assert changed[CAROL] == replace(
        carol, gossip_timestamp=NOW - DAY, gossip_key=changed[CAROL].gossip_key
    )
    assert PublicKey.from_bytes(changed[CAROL].gossip_key) == bob_key.public_key


@pytest.mark.parametrize(
    ("case", "state", "mail", "changes"),
    [
        ("new peer", None, dict(), True),
        ("older gossip than stored", dict(gossip_timestamp=NOW), dict(), False),
        ("same date as stored", dict(gossip_timestamp=NOW - DAY), dict(), True),
        ("not a recipient", None, dict(recipients=(BOB,)), False),
        ("about the sender", None, dict(recipients=("alice@example.org",)), False),
    ],
)
def test_gossip_table(bob_key: SecretKey, case: str, state, mail, changes: bool) -> None:
    addr = "alice@example.org" if case == "about the sender" else CAROL
    states = {addr: PeerState(addr=addr, **state)} if state is not None else {}
    got = update_gossip(states, gossip_facts(gossip_for(bob_key, addr), **mail), NOW)
    assert (addr in got) is changes, case


def test_gossip_about_one_address_twice_is_ignored(bob_key: SecretKey, bob_new_key) -> None:
    mail = gossip_facts(gossip_for(bob_key), gossip_for(bob_new_key))
    assert update_gossip({}, mail, NOW) == {}


def test_gossip_of_an_ignored_mail_is_ignored(bob_key: SecretKey) -> None:
    mail = replace(gossip_facts(gossip_for(bob_key)), ignore_reason="auto-replied")
    assert update_gossip({}, mail, NOW) == {}


# --- the recommendation ----------------------------------------------------------------------


def peer(key: SecretKey | None = None, gossip: SecretKey | None = None, **kw) -> PeerState:
    return PeerState(
        addr=kw.pop("addr", BOB),
        last_seen=kw.pop("last_seen", NOW),
        autocrypt_timestamp=kw.pop("autocrypt_timestamp", NOW if key else None),
        public_key=key.public_key.to_bytes() if key else None,
        prefer_encrypt=kw.pop("prefer_encrypt", MUTUAL),
        gossip_timestamp=NOW if gossip else None,
        gossip_key=gossip.public_key.to_bytes() if gossip else None,
    )


STALE = NOW - STALE_SECONDS - 1
FRESH = NOW - STALE_SECONDS  # exactly 35 days: not "more than"

# (case, peer factory, own prefer-encrypt, reply to encrypted, expected)
RECOMMEND_TABLE = [
    ("no peer", lambda k: None, MUTUAL, False, Recommendation.DISABLE),
    ("peer without keys", lambda k: peer(), MUTUAL, False, Recommendation.DISABLE),
    ("both mutual", lambda k: peer(k), MUTUAL, False, Recommendation.ENCRYPT),
    ("peer nopreference", lambda k: peer(k, prefer_encrypt=NOPREFERENCE), MUTUAL, False,
     Recommendation.AVAILABLE),
    ("own nopreference", lambda k: peer(k), NOPREFERENCE, False, Recommendation.AVAILABLE),
    ("stale key (>35 days)", lambda k: peer(k, autocrypt_timestamp=STALE), MUTUAL, False,
     Recommendation.DISCOURAGE),
    ("exactly 35 days", lambda k: peer(k, autocrypt_timestamp=FRESH), MUTUAL, False,
     Recommendation.ENCRYPT),
    ("stale, reply to encrypted", lambda k: peer(k, autocrypt_timestamp=STALE), MUTUAL, True,
     Recommendation.ENCRYPT),
    ("gossip only", lambda k: peer(gossip=k), MUTUAL, False, Recommendation.DISCOURAGE),
    ("gossip only, reply to encrypted", lambda k: peer(gossip=k), MUTUAL, True,
     Recommendation.ENCRYPT),
    ("nopreference, reply to encrypted", lambda k: peer(k, prefer_encrypt=NOPREFERENCE),
     NOPREFERENCE, True, Recommendation.ENCRYPT),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "own", "reply", "expected"), RECOMMEND_TABLE)
def test_recommendation_table(bob_key: SecretKey, case, make, own, reply, expected) -> None:
    advice = recommend(make(bob_key), own_prefer_encrypt=own, reply_to_encrypted=reply)
    assert advice.recommendation is expected, case
    if expected is not Recommendation.DISABLE:
        assert PublicKey.from_bytes(advice.target_keys[BOB]) == bob_key.public_key


def test_public_key_wins_over_gossip_key(bob_key: SecretKey, bob_new_key: SecretKey) -> None:
    advice = recommend(peer(bob_key, gossip=bob_new_key))
    assert PublicKey.from_bytes(advice.target_keys[BOB]) == bob_key.public_key


def test_unusable_public_key_falls_back_to_gossip(bob_key: SecretKey) -> None:
    broken = replace(peer(gossip=bob_key), public_key=b"\x99\x00garbage")
    advice = recommend(broken)
    assert advice.recommendation is Recommendation.DISCOURAGE
    assert PublicKey.from_bytes(advice.target_keys[BOB]) == bob_key.public_key
    assert recommend(replace(broken, gossip_key=None)).recommendation is Recommendation.DISABLE


def test_key_without_encryption_subkey_is_treated_as_absent() -> None:
    from openpgp.composed import (
        EncryptionCaps,
        KeyType,
        SecretKeyParamsBuilder,
        SubkeyParamsBuilder,
    )

    # The builder has no expiry setter; a key whose only subkey signs is the same case for the
    # rule ("revoked, expired, or otherwise known to be unusable for encryption").
    sub = SubkeyParamsBuilder().version(4).key_type(KeyType.ed25519_legacy()).can_sign(True)
    native = (
        SecretKeyParamsBuilder()
        .version(4)
        .key_type(KeyType.ed25519_legacy())
        .can_sign(True)
        .can_certify(True)
        .can_encrypt(EncryptionCaps.none())
        .primary_user_id(BOB)
        .subkey(sub.build())
        .generate()
    )
    public_key = bytes(native.to_public_key().to_bytes())
    state = PeerState(BOB, NOW, NOW, public_key, MUTUAL)
    assert recommend(state).recommendation is Recommendation.DISABLE


# (case, per-recipient recommendations, expected) for a mail to several recipients
GROUP_TABLE = [
    ("all encrypt", ["encrypt", "encrypt"], Recommendation.ENCRYPT),
    ("one disable", ["encrypt", "disable"], Recommendation.DISABLE),
    ("disable beats discourage", ["discourage", "disable"], Recommendation.DISABLE),
    ("one discourage", ["encrypt", "discourage"], Recommendation.DISCOURAGE),
    ("one available", ["encrypt", "available"], Recommendation.AVAILABLE),
    ("discourage beats available", ["available", "discourage"], Recommendation.DISCOURAGE),
    ("nobody", [], Recommendation.DISABLE),
]


@pytest.mark.parametrize(("case", "each", "expected"), GROUP_TABLE)
def test_group_recommendation_table(bob_key: SecretKey, case, each, expected) -> None:
    makers = {
        "encrypt": lambda a: peer(bob_key, addr=a),
        "available": lambda a: peer(bob_key, addr=a, prefer_encrypt=NOPREFERENCE),
        "discourage": lambda a: peer(gossip=bob_key, addr=a),
        "disable": lambda a: None,
    }
    peers = {f"p{i}@example.net": makers[r](f"p{i}@example.net") for i, r in enumerate(each)}
    advice = recommend_all(peers)
    assert advice.recommendation is expected, case
    assert set(advice.target_keys) == {a for a, p in peers.items() if p is not None}


# --- what is stored --------------------------------------------------------------------------


def test_mailbox_key_round_trip() -> None:
    stored = MailboxKey.generate("Alice@Example.ORG", created_at=NOW)
    assert stored.address == "alice@example.org"
    assert stored.created_at == NOW
    key = stored.key()
    assert key.fingerprint == stored.fingerprint
    assert key.user_ids == ["alice@example.org"]
    assert stored.public_key().fingerprint == stored.fingerprint


def test_sealed_secret_key_round_trip() -> None:
    from bridge.crypto.sealed import seal_bytes, unseal_bytes

    stored = MailboxKey.generate("alice@example.org")
    sealed = seal_bytes("pickle", "openpgp-key", stored.secret_key)
    assert stored.secret_key not in sealed
    restored = replace(stored, secret_key=unseal_bytes("pickle", "openpgp-key", sealed))
    assert restored.key().fingerprint == stored.fingerprint
