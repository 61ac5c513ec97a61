from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


# The mailbox of a local user: one definition, both directions (issue 9 item 4).

@pytest.mark.parametrize(
    ("user_id", "address"),
    [
        ("@alice:localhost", "alice@mail.example"),
        ("@first.last:localhost", "first.last@mail.example"),
        ("@a_b=c/d-e:localhost", "a_b=c/d-e@mail.example"),
        # Spec 1.8 allows "+" in new IDs, but "alice+x@" is alice's mailbox with the tag "x".
        ("@alice+x:localhost", None),
        ("@Alice:localhost", None),  # historical upper case: "Alice@" is @alice's mailbox
        ("@.alice:localhost", None),
        ("@alice.:localhost", None),
        ("@al..ice:localhost", None),
        ("@" + "a" * 65 + ":localhost", None),
        ("@alice:elsewhere.example", None),  # a remote user is not our alice
        ("@alice:localhost:8448", None),
        ("alice:localhost", None),
    ],
)
def test_local_mailbox_address(user_id: str, address: str | None) -> None:
    from bridge.identifiers import local_mailbox_address, mailbox_refusal

    assert local_mailbox_address(user_id, "localhost", "Mail.Example") == address
    if address is None:
        assert user_id in mailbox_refusal(user_id, "localhost")


def test_plus_in_a_matrix_id_never_sends_as_someone_else() -> None:
    from bridge.identifiers import local_mailbox_address

    # What outgoing.py did before: the localpart as it is, so @alice+x sent as alice+x@, which
    # delivers to @alice.
    assert parse_local_mailbox("alice+x") == Mailbox("alice", "x")
    assert local_mailbox_address("@alice+x:localhost", "localhost", "localhost") is None


_LOCALPART_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789._=-/+ABCXYZ"


@given(st.text(alphabet=_LOCALPART_CHARS, min_size=1, max_size=70), st.text(max_size=10))
def test_mailbox_address_and_parse_are_inverse(localpart: str, tag: str) -> None:
    from bridge.identifiers import local_mailbox_address

    address = local_mailbox_address(f"@{localpart}:hs", "hs", "mail.example")
    if address is None:
        return
    local, _, domain = address.rpartition("@")
    assert domain == "mail.example"
    # The address (in any case, with any tag) delivers to this user and nobody else.
    assert parse_local_mailbox(local) == Mailbox(localpart, "")
    assert parse_local_mailbox(local.upper()) == Mailbox(localpart, "")
    assert parse_local_mailbox(f"{local}+{tag}") == Mailbox(localpart, tag)
    assert Mailbox(localpart, "").user_id("hs") == f"@{localpart}:hs"
    # And it is a plain address the composer accepts.
    from bridge.formatter.to_email import check_address

    assert check_address(address) == address


@given(st.text(alphabet=_LOCALPART_CHARS, min_size=1, max_size=70))
def test_every_mailbox_belongs_to_a_user_who_sends_from_it(local: str) -> None:
    from bridge.identifiers import local_mailbox_address

    mailbox = parse_local_mailbox(local)
    if mailbox is None:
        return
    user_id = mailbox.user_id("hs")
    address = local_mailbox_address(user_id, "hs", "mail.example")
    assert address == f"{mailbox.localpart}@mail.example"
