"""The inbound limiter and the recipient cache stay bounded, whatever senders and RCPTs arrive.

Time is moved by hand (the modules read time.monotonic at each call), never slept through.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.db import open_database
from bridge.email import mailbox, ratelimit
from bridge.email.mailbox import KnownMailboxes, RecipientCheck
from bridge.email.ratelimit import SlidingWindow
from bridge.permissions import Permissions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(ratelimit.time, "monotonic", fake)
    return fake


def test_an_expired_key_is_forgotten_not_reinserted(clock: Clock) -> None:
    limiter = SlidingWindow(2, window=60)
    limiter.hit("bob@example.test")
    clock.now += 61
    # Asking about a key whose events all expired must not keep (or re-create) its entry.
    assert limiter.allowed("bob@example.test")
    assert limiter.retry_after("bob@example.test") == 0
    assert limiter.allowed("never-seen@example.test")
    assert len(limiter._events) == 0


def test_the_window_slides(clock: Clock) -> None:
    limiter = SlidingWindow(2, window=60)
    limiter.hit("k")
    clock.now += 30
    limiter.hit("k")
    assert not limiter.allowed("k") and limiter.retry_after("k") == 31
    clock.now += 31
    assert limiter.allowed("k")


def test_keys_are_bounded_and_the_most_recent_are_kept(clock: Clock) -> None:
    limiter = SlidingWindow(1, window=3600, max_keys=3)
    for n in range(10):
        limiter.hit(f"sender{n}@example.test")
        clock.now += 1
    assert len(limiter._events) == 3
    # The three most recent senders are still limited; older ones were forgotten.
    assert [limiter.allowed(f"sender{n}@example.test") for n in (6, 7, 8, 9)] == [
        True,
        False,
        False,
        False,
    ]


def test_expired_keys_make_room_before_active_ones_are_evicted(clock: Clock) -> None:
    limiter = SlidingWindow(1, window=60, max_keys=2)
    limiter.hit("old")
    clock.now += 30
    limiter.hit("active")
    clock.now += 31  # "old" has expired, "active" has not
    limiter.hit("new")
    assert not limiter.allowed("active") and not limiter.allowed("new")


def test_events_per_key_are_bounded_by_the_limit(clock: Clock) -> None:
    limiter = SlidingWindow(3, window=3600)
    for _ in range(1000):
        limiter.hit("busy")
    assert len(limiter._events["busy"]) == 3


async def test_the_recipient_cache_is_bounded_and_expires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    monkeypatch.setattr(mailbox.time, "monotonic", clock)
    asked: list[str] = []

    async def user_exists(user_id: str) -> bool | None:
        asked.append(user_id)
        return user_id == "@alice:hs.test"

    db = await open_database(f"sqlite:{tmp_path / 'bridge.db'}")
    try:
        check = RecipientCheck(
            email_domain="bridge.test",
            homeserver_domain="hs.test",
            permissions=Permissions({"hs.test": "user"}, "hs.test"),
            user_exists=user_exists,
            reserved_localparts=lambda localpart: False,
            known=KnownMailboxes(db),
            cache_size=5,
        )
        # A dictionary attack: every RCPT a new name.
        for n in range(50):
            assert (await check.check(f"guess{n}@bridge.test"))[0] is None
        assert len(check._cache) == 5
        # Alice is looked up once, then answered from the cache...
        for _ in range(3):
            assert (await check.check("alice@bridge.test"))[0] is not None
        assert asked.count("@alice:hs.test") == 1
        # ...until her entry expires.
        clock.now += mailbox.EXISTS_TTL + 1
        assert (await check.check("alice@bridge.test"))[0] is not None
        assert asked.count("@alice:hs.test") == 2
        assert len(check._cache) <= 5
    finally:
        await db.stop()


@pytest.mark.parametrize(
    ("ip", "exempt"),
    [
        ("127.0.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),  # an IPv4 peer as a dual-stack listener sees it
        ("192.0.2.7", False),
        ("not an address", False),
    ],
)
def test_exempt_networks(ip: str, exempt: bool) -> None:
    from bridge.email.listener import Sessions

    assert Sessions(exempt=["127.0.0.0/8", "::1/128"]).is_exempt(ip) is exempt
