"""The Matrix handler's routing with fakes: the on_user_joined hook, explicit commands, and no
import of another edge."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from mautrix.types import Event, RoomID, StateEvent, UserID
from mautrix.util.async_db import Database

from bridge.direct import is_direct_chat
from bridge.matrix.bot import default_commands
from bridge.matrix.handler import MatrixHandler

BOT = UserID("@cloakroom:hs")
ALICE = UserID("@alice:hs")
GHOST = UserID("@_email_bob=40example.org:hs")
ROOM = RoomID("!room:hs")


@dataclass
class FakeStateStore:
    joined: set[RoomID] = field(default_factory=lambda: {ROOM})

    async def is_joined(self, room_id: RoomID, user_id: UserID) -> bool:
        return room_id in self.joined


@dataclass
class FakeBot:
    mxid: UserID = BOT
    state_store: FakeStateStore = field(default_factory=FakeStateStore)


class FakeSender:
    machine = None

    async def handle_member_event(self, evt: StateEvent) -> None:
        pass

    async def request_key(self, evt: Any) -> None:
        pass


@dataclass
class FakeHub:
    portals: Any


def member(user: UserID, membership: str, prev: str | None = None,
           room: RoomID = ROOM) -> Event:
    raw: dict[str, Any] = {
        "type": "m.room.member", "room_id": room, "sender": user, "state_key": user,
        "event_id": f"$m-{user}-{membership}", "origin_server_ts": 1,
        "content": {"membership": membership},
    }
    if prev:
        raw["unsigned"] = {"prev_content": {"membership": prev}}
    return StateEvent.deserialize(raw)


def make_handler(db: Database) -> MatrixHandler:
    portals = type("Portals", (), {"db": db})()
    handler = MatrixHandler(FakeBot(), FakeSender(), FakeHub(portals), None,  # type: ignore[arg-type]
                            "_email_{address}", "hs")
    return handler


async def test_on_user_joined_is_called_for_people_joining_rooms_the_bot_is_in(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    handler = make_handler(db)
    calls: list[tuple[UserID, RoomID]] = []

    async def joined(user_id: UserID, room_id: RoomID) -> None:
        calls.append((user_id, room_id))
        if user_id == UserID("@crash:hs"):
            raise RuntimeError("hook bug")

    handler.on_user_joined = joined
    for evt in (
        member(ALICE, "join", prev="invite"),
        member(GHOST, "join"),  # ours
        member(BOT, "join"),  # ours
        member(ALICE, "join", prev="join"),  # a profile change, not a join
        member(UserID("@carol:hs"), "join", room=RoomID("!elsewhere:hs")),  # bot not there
        member(UserID("@crash:hs"), "join"),
    ):
        await handler.dispatch(evt)
    await handler.queues.drain()
    assert calls == [(ALICE, ROOM), (UserID("@crash:hs"), ROOM)]
    assert any("on_user_joined failed" in r.getMessage() for r in caplog.records)
    await handler.stop()


async def test_without_a_hook_joins_are_routed_as_before(db: Database) -> None:
    handler = make_handler(db)
    assert handler.on_user_joined is None
    await handler.dispatch(member(ALICE, "join"))
    await handler.queues.drain()
    await handler.stop()


def test_commands_are_registered_explicitly_not_on_import() -> None:
    first, second = default_commands(), default_commands()
    assert list(first.commands) == ["help", "status", "new", "checkup", "guard"]
    assert first is not second and first.commands is not second.commands
    import bridge.matrix.commands as commands

    assert not hasattr(commands, "registry"), "no module-global registry filled by decorators"


def test_the_matrix_edge_does_not_import_onboarding() -> None:
    code = (
        "import sys, bridge.matrix.handler, bridge.matrix.bot, bridge.matrix.commands_guard, "
        "bridge.matrix.commands_checkup; "
        "print([m for m in sys.modules if m.startswith('bridge.onboarding')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_one_definition_of_a_direct_chat() -> None:
    assert is_direct_chat([ALICE, BOT])
    assert is_direct_chat([ALICE, BOT, ALICE])  # one person counted once
    assert not is_direct_chat([ALICE])
    assert not is_direct_chat([ALICE, BOT, UserID("@carol:hs")])
