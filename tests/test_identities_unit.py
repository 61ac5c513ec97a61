"""Identities kept in memory, and the bot's cross-signing check, as pure units (no homeserver).

The integration tests (test_identity.py, test_ghost_identity.py) show the identities working;
these pin down two failure modes that only a fault makes visible.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from mautrix.errors import MatrixConnectionError

from bridge.crypto import account as account_module
from bridge.crypto.account import CryptoAccount, CryptoSetupError
from bridge.crypto.identities import Identities


class FakeAccount:
    """What Identities needs of a CryptoAccount: a user, a machine, start and close."""

    started: list[str] = []

    def __init__(self, *, user_id: str, **_: Any) -> None:
        self.user_id = user_id
        self.machine = SimpleNamespace(send_keys_min_trust=None)
        self.closed = False

    async def start(self) -> None:
        FakeAccount.started.append(self.user_id)

    async def close(self) -> None:
        self.closed = True


def identities(monkeypatch: pytest.MonkeyPatch, max_loaded: int) -> Identities:
    monkeypatch.setattr("bridge.crypto.identities.CryptoAccount", FakeAccount)
    bot = SimpleNamespace(user_id="@bot:hs", machine=SimpleNamespace(send_keys_min_trust=None))
    return Identities(
        bot=bot,  # type: ignore[arg-type]
        is_ghost=lambda u: u.startswith("@ghost"),
        homeserver="http://127.0.0.1:1",
        as_token="t",
        pickle_key="k",
        db=SimpleNamespace(),  # type: ignore[arg-type]
        state_store=SimpleNamespace(),  # type: ignore[arg-type]
        max_loaded=max_loaded,
    )


async def test_an_identity_in_use_is_never_evicted(monkeypatch: pytest.MonkeyPatch) -> None:
    ids = identities(monkeypatch, max_loaded=1)
    async with ids.using("@ghost1:hs") as first:
        # Loading two more while the first is busy must not close (or reload) the first: a
        # second copy would hold its own Olm sessions and fork the ratchets.
        second = await ids.for_user("@ghost2:hs")
        await ids.for_user("@ghost3:hs")
        assert not first.closed
        assert await ids.for_user("@ghost1:hs") is first
        assert second.closed
    # Once released, it may go like any other.
    await ids.for_user("@ghost4:hs")
    assert first.closed
    assert FakeAccount.started.count("@ghost1:hs") == 1


async def test_concurrent_first_use_loads_one_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeAccount.started.clear()
    ids = identities(monkeypatch, max_loaded=8)
    loaded = await asyncio.gather(*(ids.for_user("@ghost9:hs") for _ in range(5)))
    assert len({id(a) for a in loaded}) == 1
    assert FakeAccount.started == ["@ghost9:hs"]


async def test_a_transient_keys_query_failure_never_replaces_the_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only a definite answer from the homeserver may lead to new cross-signing keys."""
    monkeypatch.setattr(account_module, "CROSS_SIGNING_QUERY_ATTEMPTS", 2)
    account = CryptoAccount.__new__(CryptoAccount)
    account.user_id = "@bot:hs"
    account.log = SimpleNamespace(warning=lambda *a, **k: None, info=lambda *a, **k: None)
    generated: list[bool] = []

    async def unreachable(_users: Any) -> Any:
        raise MatrixConnectionError("homeserver restarting")

    async def generate_recovery_key() -> str:
        generated.append(True)
        return "new-key"

    account.client = SimpleNamespace(query_keys=unreachable)
    account.machine = SimpleNamespace(generate_recovery_key=generate_recovery_key)
    monkeypatch.setattr(account_module.asyncio, "sleep", _no_wait)
    with pytest.raises(CryptoSetupError, match="not replacing them"):
        await account._ensure_cross_signed()
    assert generated == []


async def _no_wait(_seconds: float) -> None:
    return None
