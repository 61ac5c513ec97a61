"""The `permissions` section resolved to a level per Matrix user ID."""

from __future__ import annotations

import pytest

from bridge.permissions import Level, Permissions

DOMAIN = "example.org"


@pytest.mark.parametrize(
    ("user_id", "expected"),
    [
        ("@alice:example.org", Level.USER),
        ("@bob:example.org", Level.USER),
        ("@alice:other.org", Level.NONE),
        # A server name that merely starts or ends with ours is another server.
        ("@alice:example.org.evil", Level.NONE),
        ("@alice:sub.example.org", Level.NONE),
        ("@alice:example.org:8448", Level.NONE),
    ],
)
def test_empty_rules_admit_the_homeserver_domain_only(user_id: str, expected: Level) -> None:
    assert Permissions({}, DOMAIN).level(user_id) == expected


RULES = {
    "*": "user",
    "other.org": "none",
    "@carol:other.org": "admin",
    "@mallory:example.org": "none",
    "example.org": "user",
    "@root:example.org": "admin",
    "port.org:8448": "admin",
}


@pytest.mark.parametrize(
    ("user_id", "expected"),
    [
        ("@alice:example.org", Level.USER),  # server rule
        ("@root:example.org", Level.ADMIN),  # exact MXID beats the server
        ("@mallory:example.org", Level.NONE),  # "none" shuts out a user of an allowed domain
        ("@dave:other.org", Level.NONE),  # server beats "*"
        ("@carol:other.org", Level.ADMIN),  # exact MXID beats a "none" server
        ("@eve:elsewhere.net", Level.USER),  # only "*" applies
        ("@op:port.org:8448", Level.ADMIN),  # the server part keeps its port
        ("@op:port.org", Level.USER),
    ],
)
def test_most_specific_rule_wins(user_id: str, expected: Level) -> None:
    assert Permissions(RULES, DOMAIN).level(user_id) == expected


@pytest.mark.parametrize(
    ("rules", "user_id", "expected"),
    [
        # Non-empty rules replace the default: the local domain is not implied any more.
        ({"@alice:other.org": "admin"}, "@bob:example.org", Level.NONE),
        ({"@alice:other.org": "admin"}, "@alice:other.org", Level.ADMIN),
        ({"*": "none"}, "@alice:example.org", Level.NONE),
        ({"*": "admin"}, "@anyone:anywhere.net", Level.ADMIN),
    ],
)
def test_explicit_rules_replace_the_default(
    rules: dict[str, str], user_id: str, expected: Level
) -> None:
    assert Permissions(rules, DOMAIN).level(user_id) == expected


@pytest.mark.parametrize(
    ("user_id", "is_user", "is_admin"),
    [
        ("@root:example.org", True, True),
        ("@alice:example.org", True, False),
        ("@mallory:example.org", False, False),
        ("@dave:other.org", False, False),
    ],
)
def test_is_user_and_is_admin(user_id: str, is_user: bool, is_admin: bool) -> None:
    perms = Permissions(RULES, DOMAIN)
    assert perms.is_user(user_id) is is_user
    assert perms.is_admin(user_id) is is_admin


def test_levels_are_ordered() -> None:
    assert Level.NONE < Level.USER < Level.ADMIN
