from __future__ import annotations

import re

import pytest

from bridge.identifiers import (
    Mailbox,
    encode_localpart,
    ghost_mxid,
    parse_local_mailbox,
)
from bridge.portal.ghosts import ghost_displayname
from bridge.registration import user_regex


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("bob@example.org", "bob=40example.org"),
        ("Bob@Example.org", "_bob=40_example.org"),
        ("first_last@x.y", "first__last=40x.y"),
        ("a=b@x", "a=3db=40x"),
        ("a+tag@x", "a+tag=40x"),
        ("josé@x", "jos=c3=a9=40x"),
        ("a b", "a=20b"),
    ],
)
def test_encode_localpart(value: str, encoded: str) -> None:
    assert encode_localpart(value) == encoded
    assert re.fullmatch(r"[a-z0-9._=/+-]+", encoded)


def test_ghost_mxid_is_normalised_and_in_the_registered_namespace() -> None:
    mxid = ghost_mxid("_email_{address}", " Bob@Example.ORG ", "localhost")
    assert mxid == "@_email_bob=40example.org:localhost"
    assert re.match(user_regex("_email_{address}", "localhost"), mxid)


@pytest.mark.parametrize(
    ("local", "mailbox"),
    [
        ("alice", Mailbox("alice", "")),
        ("Alice+News", Mailbox("alice", "News")),
        ("alice+a+b", Mailbox("alice", "a+b")),
        ("+tag", None),
        ("al ice", None),
        ("ali%ce", None),
    ],
)
def test_parse_local_mailbox(local: str, mailbox: Mailbox | None) -> None:
    assert parse_local_mailbox(local) == mailbox


@pytest.mark.parametrize(
    ("name", "address", "shown"),
    [
        ("Bob Example", "bob@x.org", "Bob Example (bob@x.org)"),
        ("", "bob@x.org", "bob@x.org"),
        ("bob@x.org", "bob@x.org", "bob@x.org"),
        ("  Bob \r\n  Ex ", "bob@x.org", "Bob Ex (bob@x.org)"),
    ],
)
def test_ghost_displayname(name: str, address: str, shown: str) -> None:
    assert ghost_displayname(name, address) == shown


@pytest.mark.parametrize("address", ["bob@example.org", "first_last@x.y", "jos\u00e9@x", "a+b@c"])
def test_ghost_address_inverts_ghost_mxid(address: str) -> None:
    from bridge.identifiers import ghost_address

    mxid = ghost_mxid("_email_{address}", address, "localhost")
    assert ghost_address("_email_{address}", mxid, "localhost") == address


@pytest.mark.parametrize(
    "user_id",
    [
        "@alice:localhost",
        "@_email_bob=40x.org:other",
        "@_email_nobody:localhost",
        "@_email_=zz:localhost",
    ],
)
def test_ghost_address_rejects_non_ghosts(user_id: str) -> None:
    from bridge.identifiers import ghost_address

    assert ghost_address("_email_{address}", user_id, "localhost") is None


@pytest.mark.parametrize(
    ("user_id", "ours"),
    [
        ("@_email_bob=40x.org:localhost", True),
        ("@_email_=zz:localhost", True),  # in our namespace even if it decodes to nothing
        ("@_email_:localhost", False),
        ("@_email_bob=40x.org:other", False),
        ("@alice:localhost", False),
    ],
)
def test_is_ghost_follows_the_registered_namespace(user_id: str, ours: bool) -> None:
    from bridge.identifiers import is_ghost

    assert is_ghost("_email_{address}", user_id, "localhost") is ours
    assert bool(re.match(user_regex("_email_{address}", "localhost"), user_id)) is ours
