"""The encryption guard against a real Synapse: the onboarding bridge (guard: private), which
serves only the users onb1…onb20 (this file uses onb1…onb5, onb15 and onb16), checked with
matrix-nio."""

from __future__ import annotations

import asyncio
import secrets
import urllib.parse

from nio import (
    AsyncClient,
    Event,
    RoomCreateResponse,
    RoomEncryptionEvent,
    RoomGetStateEventResponse,
    RoomJoinRulesEvent,
    RoomMessageNotice,
    RoomMessageText,
)
from nio.api import RoomPreset
from ruamel.yaml import YAML

from .harness import Env, from_sender, open_dm_with_bot, room_history, send_text, sync_until

ONBOARDING_BOT = "@onboarding:localhost"
NOTICE_START = "Cloakroom (on behalf of your homeserver)"


async def create_room(client: AsyncClient, preset: RoomPreset) -> str:
    resp = await client.room_create(preset=preset)
    assert isinstance(resp, RoomCreateResponse), resp
    return resp.room_id


async def is_encrypted(client: AsyncClient, room_id: str) -> bool:
    resp = await client.room_get_state_event(room_id, "m.room.encryption")
    return isinstance(resp, RoomGetStateEventResponse) and bool(resp.content.get("algorithm"))


async def wait_encrypted(client: AsyncClient, room_id: str) -> RoomEncryptionEvent:
    _, evt = await sync_until(
        client, lambda rid, e: rid == room_id and isinstance(e, RoomEncryptionEvent)
    )
    return evt


async def set_join_rule(client: AsyncClient, room_id: str, rule: str) -> None:
    resp = await client.room_put_state(room_id, "m.room.join_rules", {"join_rule": rule})
    assert hasattr(resp, "event_id"), resp


def is_guard_notice(event: Event) -> bool:
    return isinstance(event, RoomMessageNotice) and event.body.startswith(NOTICE_START)


def index_of(events: list[Event], predicate: object) -> int:
    return next(i for i, e in enumerate(events) if predicate(e))  # type: ignore[operator]


async def guard_barrier(client: AsyncClient, room_id: str) -> None:
    """Say `!cloakroom guard ignore` in the (unencrypted) room and wait for the guard's answer:
    the guard works through a room's events in order, so everything before it is done."""
    await client.sync(timeout=0)  # nio sends only to rooms it knows
    await client.room_send(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "!cloakroom guard ignore"}
    )
    await sync_until(
        client,
        lambda rid, e: rid == room_id and isinstance(e, RoomMessageNotice)
        and e.sender == client.user_id and "leave" in e.body,
    )


async def test_private_room_is_encrypted_with_one_notice(onboarding: Env) -> None:
    user = await onboarding.new_user("onb1")
    room_id = await create_room(user, RoomPreset.private_chat)
    encryption = await wait_encrypted(user, room_id)
    # Acting as the user: the creator has the power; the bot is not even in the room.
    assert encryption.sender == user.user_id
    assert encryption.source["content"]["algorithm"] == "m.megolm.v1.aes-sha2"
    await send_text(user, room_id, "after the guard")
    await sync_until(user, from_sender(room_id, user.user_id))
    events = await room_history(user, room_id)
    notices = [e for e in events if is_guard_notice(e)]
    assert len(notices) == 1, notices
    assert notices[0].sender == user.user_id
    assert "guard ignore" in notices[0].body
    # The notice came first, in plaintext, so every member's client could read it.
    assert index_of(events, is_guard_notice) < index_of(
        events, lambda e: isinstance(e, RoomEncryptionEvent)
    )
    assert index_of(events, lambda e: isinstance(e, RoomMessageText)
                    and e.body == "after the guard") == len(events) - 1


async def test_public_room_is_left_alone_until_it_goes_private(onboarding: Env) -> None:
    user = await onboarding.new_user("onb2")
    public = await create_room(user, RoomPreset.public_chat)
    private = await create_room(user, RoomPreset.private_chat)
    await wait_encrypted(user, private)
    # The guard saw the public room first; by now it has decided to leave it alone.
    assert not await is_encrypted(user, public)
    await set_join_rule(user, public, "invite")
    await wait_encrypted(user, public)
    events = await room_history(user, public)
    # Encrypted because of the change, not at creation: encryption comes after the change.
    change = index_of(events, lambda e: isinstance(e, RoomJoinRulesEvent)
                      and e.join_rule == "invite")
    notice = index_of(events, is_guard_notice)
    encryption = index_of(events, lambda e: isinstance(e, RoomEncryptionEvent))
    assert change < notice < encryption


async def test_guard_ignore_by_room_id_in_the_bot_dm(onboarding: Env) -> None:
    user = await onboarding.new_user("onb3")
    room_id = await create_room(user, RoomPreset.public_chat)
    dm = await open_dm_with_bot(user, ONBOARDING_BOT)
    await send_text(user, dm, "guard ignore !nosuchroom:localhost")
    _, reply = await sync_until(user, from_sender(dm, ONBOARDING_BOT))
    assert "not a member" in reply.body
    await send_text(user, dm, f"guard ignore {room_id}")
    _, reply = await sync_until(user, from_sender(dm, ONBOARDING_BOT))
    assert reply.decrypted
    assert f"will leave {room_id} alone" in reply.body
    await set_join_rule(user, room_id, "invite")
    await guard_barrier(user, room_id)
    assert not await is_encrypted(user, room_id)
    # The DM was created encrypted (initial state, as Element does): the guard kept quiet.
    assert not any(is_guard_notice(e) for e in await room_history(user, dm))


async def test_guard_ignore_said_in_the_room(onboarding: Env) -> None:
    user = await onboarding.new_user("onb4")
    room_id = await create_room(user, RoomPreset.public_chat)
    await guard_barrier(user, room_id)  # the first answer is the opt-out itself
    await set_join_rule(user, room_id, "invite")
    await guard_barrier(user, room_id)
    assert not await is_encrypted(user, room_id)
    notices = [e for e in await room_history(user, room_id) if is_guard_notice(e)]
    assert len(notices) == 2 and all("will leave" in n.body for n in notices)


async def test_rooms_of_users_the_guard_does_not_serve_are_untouched(onboarding: Env) -> None:
    # guardoutsider is not one of the onboarding bridge's users; the main bridge serves them,
    # and its guard is off.
    outsider = await onboarding.new_user("guardoutsider")
    theirs = await create_room(outsider, RoomPreset.private_chat)
    user = await onboarding.new_user("onb5")
    ours = await create_room(user, RoomPreset.private_chat)
    await wait_encrypted(user, ours)
    # The outsider's room came first and costs the guard no request: it is long decided.
    assert not await is_encrypted(outsider, theirs)
    assert onboarding.config["onboarding"]["guard"] == "off"


async def test_rooms_of_accounts_nobody_logged_into_are_left_alone(onboarding: Env) -> None:
    """onb15 exists, but no device of theirs was ever used: like another appservice's puppet.
    A room made in their name (here through the onboarding bridge's own namespace, as another
    bridge would make it) is never touched by the guard, whoever joins it."""
    synapse = onboarding.synapse
    await asyncio.to_thread(synapse.register_user, "onb15", secrets.token_urlsafe(12))
    config = YAML(typ="safe").load(onboarding.onboarding.config_path.read_text())
    puppet = urllib.parse.quote("@onb15:localhost")
    user = await onboarding.new_user("onb16")
    created = await asyncio.to_thread(
        synapse.request, "POST", f"/_matrix/client/v3/createRoom?user_id={puppet}",
        {"preset": "private_chat", "invite": [user.user_id]}, config["appservice"]["as_token"],
    )
    room_id = created["room_id"]
    await user.join(room_id)
    # The guard handles a room's events in order: its answer to this comes after the join.
    await guard_barrier(user, room_id)
    assert not await is_encrypted(user, room_id)
    assert not any(is_guard_notice(e) and "encryption is being turned on" in e.body
                   for e in await room_history(user, room_id))
