"""The encryption guard's decisions, against a fake homeserver (no Synapse): fast and exact."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mautrix.errors import IntentError, MForbidden, MNotFound
from mautrix.types import (
    EventType,
    MessageEvent,
    RoomID,
    StateEvent,
    UserID,
)
from mautrix.util.async_db import Database

from bridge.onboarding.guard import (
    ENCRYPTED,
    NOT_A_PERSON,
    NOTIFIED,
    EncryptionGuard,
    OwnDevices,
)
from bridge.permissions import Permissions

ALICE = UserID("@alice:hs")
BOB = UserID("@bob:hs")
MALLORY = UserID("@mallory:hs")  # not permitted
BOT = UserID("@cloakroom:hs")
PUPPET = UserID("@telegram_123:hs")  # another appservice's user: permitted, but no device
EVE = UserID("@eve:elsewhere")  # a remote stranger
ROOM = RoomID("!room:hs")


@dataclass
class World:
    """Rooms as state events, and everything anyone did to them."""

    state: dict[RoomID, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    actions: list[tuple[str, str, RoomID, Any]] = field(default_factory=list)
    direct: dict[UserID, dict[str, list[str]]] = field(default_factory=dict)
    fail_encryption: bool = False
    reads: list[str] = field(default_factory=list)  # what the guard fetched
    not_people: set[UserID] = field(default_factory=lambda: {PUPPET})  # no device of their own

    def room(
        self, room_id: RoomID = ROOM, creator: UserID = ALICE, join_rule: str = "invite",
        members: tuple[UserID, ...] = (ALICE,), levels: dict[str, int] | None = None,
        room_type: str | None = None, encrypted: bool = False, direct: bool = False,
    ) -> RoomID:
        create: dict[str, Any] = {"room_version": "12"}
        if room_type:
            create["type"] = room_type
        events = {
            ("m.room.create", ""): (creator, create),
            ("m.room.join_rules", ""): (creator, {"join_rule": join_rule}),
            ("m.room.power_levels", ""): (creator, {"users": levels or {}}),
        }
        for user in members:
            content = {"membership": "join", "is_direct": direct and user != creator}
            events[("m.room.member", user)] = (user, content)
        if encrypted:
            events[("m.room.encryption", "")] = (creator, {"algorithm": "m.megolm.v1.aes-sha2"})
        self.state[room_id] = {
            key: {"type": key[0], "state_key": key[1], "sender": sender, "content": content,
                  "room_id": room_id, "event_id": f"$e{i}", "origin_server_ts": i}
            for i, (key, (sender, content)) in enumerate(events.items())
        }
        return room_id

    def event(self, type_: str, sender: UserID, content: dict[str, Any],
              state_key: str = "", room_id: RoomID = ROOM) -> StateEvent:
        raw = {"type": type_, "sender": sender, "content": content, "state_key": state_key,
               "room_id": room_id, "event_id": "$new", "origin_server_ts": 99}
        self.state.setdefault(room_id, {})[(type_, state_key)] = raw
        return StateEvent.deserialize(raw)

    def did(self, kind: str) -> list[tuple[str, RoomID, Any]]:
        return [(who, room, what) for who, k, room, what in self.actions if k == kind]


class FakeStateStore:
    def __init__(self) -> None:
        self.encrypted: set[RoomID] = set()

    async def set_encryption_info(self, room_id: RoomID, content: Any) -> None:
        self.encrypted.add(room_id)

    async def is_encrypted(self, room_id: RoomID) -> bool:
        return room_id in self.encrypted


class FakeIntent:
    def __init__(self, world: World, mxid: UserID, store: FakeStateStore) -> None:
        self.world, self.mxid, self.state_store = world, mxid, store

    def _joined(self, room_id: RoomID) -> bool:
        member = self.world.state.get(room_id, {}).get(("m.room.member", self.mxid))
        return bool(member and member["content"]["membership"] == "join")

    async def get_state(self, room_id: RoomID, ensure_joined: bool = True) -> list[StateEvent]:
        assert ensure_joined is False, "the guard must never make a user join"
        if not self._joined(room_id):
            raise MForbidden(403, "not in room")
        self.world.reads.append("all")
        return [StateEvent.deserialize(e) for e in self.world.state[room_id].values()]

    async def get_state_event(self, room_id: RoomID, event_type: EventType, state_key: str = "",
                              ensure_joined: bool = True) -> Any:
        assert ensure_joined is False
        if not self._joined(room_id):
            raise MForbidden(403, "not in room")
        raw = self.world.state[room_id].get((str(event_type), state_key))
        if raw is None:
            raise MNotFound(404, "no such state")
        self.world.reads.append(str(event_type))
        return StateEvent.deserialize(raw).content

    async def get_account_data(self, event_type: EventType) -> dict[str, Any]:
        if self.mxid not in self.world.direct:
            raise MNotFound(404, "no m.direct")
        return self.world.direct[self.mxid]

    async def send_message_event(self, room_id: RoomID, event_type: EventType, content: Any,
                                 txn_id: str | None = None, ensure_joined: bool = True) -> str:
        assert ensure_joined is False
        self.world.actions.append((self.mxid, "message", room_id, content.body))
        return "$msg"

    async def send_state_event(self, room_id: RoomID, event_type: EventType, content: Any,
                               ensure_joined: bool = True) -> str:
        assert ensure_joined is False
        if self.world.fail_encryption:
            raise IntentError("power levels changed")
        self.world.actions.append((self.mxid, "state", room_id, str(event_type)))
        self.world.state[room_id][(str(event_type), "")] = {
            "type": str(event_type), "state_key": "", "sender": self.mxid,
            "content": content.serialize(), "room_id": room_id, "event_id": "$enc",
            "origin_server_ts": 100,
        }
        return "$enc"


def make_guard(world: World, db: Database, mode: str = "private",
               ignore_rooms: tuple[str, ...] = ()) -> EncryptionGuard:
    store = FakeStateStore()

    async def notify(room_id: RoomID, text: str, html: str) -> None:
        world.actions.append((BOT, "message", room_id, text))

    async def is_person(user_id: UserID) -> bool:
        return user_id not in world.not_people

    return EncryptionGuard(
        mode=mode,
        intent_for=lambda mxid: FakeIntent(world, mxid, store),
        bot=FakeIntent(world, BOT, store),
        permissions=Permissions({"hs": "user", MALLORY: "none"}, "hs"),
        db=db,
        ignore_rooms=ignore_rooms,
        notify=notify,
        is_person=is_person,
    )


def last_creation_event(world: World, room_id: RoomID = ROOM) -> StateEvent:
    """The last event of a room's creation: its join rules."""
    raw = world.state[room_id].get(("m.room.join_rules", ""))
    if raw is None:  # still being created: the creator's join
        raw = world.state[room_id][("m.room.member", ALICE)]
    return StateEvent.deserialize(raw)


async def test_private_room_is_encrypted_once_notice_first(db: Database) -> None:
    world = World()
    world.room()
    guard = make_guard(world, db)
    await guard.handle_event(last_creation_event(world))
    assert [(k, who) for who, k, _, _ in world.actions] == [("message", ALICE), ("state", ALICE)]
    assert world.did("message")[0][2].startswith("Cloakroom (on behalf of your homeserver)")
    assert "guard ignore" in world.did("message")[0][2]
    # Later events of the same room change nothing: the room was decided.
    await guard.handle_event(world.event("m.room.join_rules", ALICE, {"join_rule": "knock"}))
    await guard.handle_event(
        world.event("m.room.member", BOB, {"membership": "join"}, state_key=BOB)
    )
    assert len(world.actions) == 2


async def test_a_room_is_decided_once_its_creation_batch_is_in(db: Database) -> None:
    world = World()
    world.room()
    del world.state[ROOM][("m.room.join_rules", "")]
    guard = make_guard(world, db)
    await guard.handle_event(last_creation_event(world))
    assert world.actions == [] and await guard.store.outcome(ROOM) is None
    # The batch with join rules also carries the creator's initial state, e.g. encryption.
    world.event("m.room.encryption", ALICE, {"algorithm": "m.megolm.v1.aes-sha2"})
    await guard.handle_event(world.event("m.room.join_rules", ALICE, {"join_rule": "invite"}))
    assert world.actions == []


async def test_public_room_waits_until_it_goes_private(db: Database) -> None:
    world = World()
    world.room(join_rule="public")
    guard = make_guard(world, db)
    await guard.handle_event(last_creation_event(world))
    await guard.handle_event(world.event("m.room.join_rules", ALICE, {"join_rule": "public"}))
    assert world.actions == []
    assert world.reads == ["m.room.join_rules"]  # never the whole state of a public room
    await guard.handle_event(world.event("m.room.join_rules", ALICE, {"join_rule": "invite"}))
    assert [k for _, k, _, _ in world.actions] == ["message", "state"]


async def test_spaces_encrypted_rooms_and_ignored_rooms_are_left_alone(db: Database) -> None:
    world = World()
    space = world.room(RoomID("!space:hs"), room_type="m.space")
    done = world.room(RoomID("!done:hs"), encrypted=True)
    listed = world.room(RoomID("!listed:hs"))
    opted = world.room(RoomID("!opted:hs"))
    guard = make_guard(world, db, ignore_rooms=(listed,))
    assert "leave" in await guard.ignore(opted, ALICE)
    for room_id in (space, done, listed, opted):
        await guard.handle_event(last_creation_event(world, room_id))
    assert world.actions == []


async def test_unpermitted_users_and_mode_off_do_nothing(db: Database) -> None:
    world = World()
    world.room(creator=MALLORY, members=(MALLORY,))
    await make_guard(world, db).handle_event(last_creation_event(world))
    assert world.actions == []
    other = world.room(RoomID("!other:hs"))
    await make_guard(world, db, mode="off").handle_event(last_creation_event(world, other))
    assert world.actions == []
    assert "off" in await make_guard(world, db, mode="off").ignore(ROOM, ALICE)


async def test_who_turns_encryption_on(db: Database) -> None:
    """The user; else the room's creator if we serve them; else the bot; else nobody speaks."""
    alice_joins = {"membership": "join"}
    # Bob created it (room v12: creators have unlimited power); Alice joined with level 0.
    world = World()
    world.room(creator=BOB, members=(BOB, ALICE))
    guard = make_guard(world, db)
    await guard.handle_event(world.event("m.room.member", ALICE, alice_joins, state_key=ALICE))
    assert [(who, k) for who, k, _, _ in world.actions] == [(BOB, "message"), (BOB, "state")]
    # Mallory (not served) created it; the bot is in the room with power.
    world = World()
    room = world.room(RoomID("!bot:hs"), MALLORY, members=(MALLORY, ALICE, BOT), levels={BOT: 100})
    guard = make_guard(world, db)
    await guard.handle_event(
        world.event("m.room.member", ALICE, alice_joins, state_key=ALICE, room_id=room)
    )
    assert [(who, k) for who, k, _, _ in world.actions] == [(BOT, "message"), (BOT, "state")]
    # Nobody we may act as has the power: nothing happens, not even a notice.
    world = World()
    room = world.room(RoomID("!nobody:hs"), MALLORY, members=(MALLORY, ALICE, BOT))
    guard = make_guard(world, db)
    await guard.handle_event(
        world.event("m.room.member", ALICE, alice_joins, state_key=ALICE, room_id=room)
    )
    assert world.actions == []


async def test_dm_mode_acts_only_in_direct_chats(db: Database) -> None:
    """One definition of a direct chat (bridge.direct): exactly two people in it."""
    world = World()
    group = world.room(RoomID("!group:hs"), members=(ALICE, BOB, BOT))
    flagged = world.room(RoomID("!flagged:hs"), members=(ALICE, BOB), direct=True)
    plain = world.room(RoomID("!plain:hs"), members=(ALICE, BOB))
    alone = world.room(RoomID("!alone:hs"), members=(ALICE,))
    guard = make_guard(world, db, mode="dm")
    for room_id in (group, flagged, plain, alone):
        await guard.handle_event(last_creation_event(world, room_id))
    assert sorted({room for _, room, _ in world.did("state")}) == sorted([flagged, plain])
    assert world.reads.count("all") == 4 and "m.direct" not in world.reads


async def test_never_acts_for_other_appservices_users_or_in_their_rooms(db: Database) -> None:
    world = World()
    # Another bridge's portal: its puppet created it; Alice (who has the power) joins.
    portal = world.room(RoomID("!portal:hs"), creator=PUPPET, members=(PUPPET, ALICE),
                        levels={ALICE: 100})
    guard = make_guard(world, db)
    await guard.handle_event(world.event("m.room.member", ALICE, {"membership": "join"},
                                         state_key=ALICE, room_id=portal))
    assert world.actions == []
    assert await guard.store.outcome(portal) == NOT_A_PERSON
    # The puppet joining (or creating) a room of its own: never acted for.
    own = world.room(RoomID("!own:hs"), creator=PUPPET, members=(PUPPET,))
    await guard.handle_event(last_creation_event(world, own))
    assert world.actions == []
    # The puppet saying a guard command in plaintext: not answered in its name.
    evt = MessageEvent.deserialize({
        "type": "m.room.message", "sender": PUPPET, "room_id": own, "event_id": "$c",
        "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": "!cloakroom guard ignore"},
    })
    await guard.handle_room_command(evt)
    assert world.actions == [] and not await guard.store.is_ignored(own)


async def test_a_strangers_invite_into_someone_elses_room_triggers_nothing(
    db: Database,
) -> None:
    world = World()
    # A remote stranger creates an unencrypted room and invites Alice, who has not joined.
    room = world.room(RoomID("!eve:elsewhere"), creator=EVE, members=(EVE,))
    guard = make_guard(world, db)
    await guard.handle_event(world.event("m.room.member", EVE, {"membership": "invite"},
                                         state_key=ALICE, room_id=room))
    assert world.actions == [] and world.reads == []
    # Bob, a local person with the power in Eve's room, invites Alice there: not his room.
    room = world.room(RoomID("!eve2:elsewhere"), creator=EVE, members=(EVE, BOB),
                      levels={BOB: 100})
    await guard.handle_event(world.event("m.room.member", BOB, {"membership": "invite"},
                                         state_key=ALICE, room_id=room))
    assert world.actions == []
    assert ("m.room.member", ALICE) in world.state[room]  # Alice is invited, not joined
    # Bob inviting into a room he created is his own room: the guard looks after it.
    mine = world.room(RoomID("!bob:hs"), creator=BOB, members=(BOB,))
    await guard.handle_event(world.event("m.room.member", BOB, {"membership": "invite"},
                                         state_key=ALICE, room_id=mine))
    assert [(who, k) for who, k, _, _ in world.actions] == [(BOB, "message"), (BOB, "state")]


class FakeApi:
    def __init__(self, devices: dict[UserID, list[dict[str, Any]]], user: UserID) -> None:
        self.devices, self.user = devices, user
        self.calls = 0

    async def request(self, method: Any, path: Any) -> dict[str, Any]:
        assert str(path).endswith("/devices")
        self.calls += 1
        return {"devices": self.devices.get(self.user, [])}


async def test_a_person_is_someone_with_a_device_they_used() -> None:
    devices = {
        ALICE: [{"device_id": "A", "last_seen_ts": 1700000000000, "last_seen_ip": "::1"}],
        PUPPET: [{"device_id": "MSC4190", "last_seen_ts": None}],  # made by its appservice
    }
    apis: dict[UserID, FakeApi] = {}

    class Intent:
        def __init__(self, user: UserID) -> None:
            self.api = apis.setdefault(user, FakeApi(devices, user))

    check = OwnDevices(Intent)
    assert await check(ALICE) and await check(ALICE)
    assert apis[ALICE].calls == 1  # a person stays a person
    assert not await check(PUPPET)
    assert not await check(BOB)  # never logged in: no device at all
    assert not await check(PUPPET) and apis[PUPPET].calls == 1  # asked again only later


async def test_a_failed_enable_is_retried_without_a_second_notice(db: Database) -> None:
    world = World(fail_encryption=True)
    world.room()
    guard = make_guard(world, db)
    await guard.handle_event(last_creation_event(world))
    assert len(world.did("message")) == 1 and not world.did("state")
    assert await guard.store.outcome(ROOM) == NOTIFIED
    world.fail_encryption = False
    await guard.handle_event(
        world.event("m.room.member", BOB, {"membership": "join"}, state_key=BOB)
    )
    assert len(world.did("message")) == 1 and len(world.did("state")) == 1
    assert await guard.store.outcome(ROOM) == ENCRYPTED


async def test_room_command_opts_out_and_answers_as_the_user(db: Database) -> None:
    world = World()
    world.room(join_rule="public")
    guard = make_guard(world, db)
    evt = MessageEvent.deserialize({
        "type": "m.room.message", "sender": ALICE, "room_id": ROOM, "event_id": "$c",
        "origin_server_ts": 1, "content": {"msgtype": "m.text", "body": "!cloakroom guard ignore"},
    })
    assert guard.is_room_command(evt)
    await guard.handle_room_command(evt)
    assert world.did("message") == [
        (ALICE, ROOM, "Cloakroom (on behalf of your homeserver): Done: the encryption guard "
                      f"will leave {ROOM} alone.")
    ]
    await guard.handle_event(world.event("m.room.join_rules", ALICE, {"join_rule": "invite"}))
    assert not world.did("state")
    not_command = MessageEvent.deserialize({**evt.serialize(), "content": {
        "msgtype": "m.text", "body": "!cloakroomguard ignore"}})
    assert not guard.is_room_command(not_command)


async def test_ignore_by_room_id_needs_membership(db: Database) -> None:
    world = World()
    world.room()
    guard = make_guard(world, db)
    assert "not a member" in await guard.ignore(ROOM, BOB)
    assert "not a room ID" in await guard.ignore(RoomID("#alias:hs"), ALICE)
    assert not await guard.store.is_ignored(ROOM)
    assert "leave" in await guard.ignore(ROOM, ALICE)
    assert await guard.store.is_ignored(ROOM)
