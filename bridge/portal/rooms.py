"""Creating portal rooms: private, encrypted from the first event, named after the conversation."""

from __future__ import annotations

import logging

from mautrix.appservice import IntentAPI
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.types import EventType, RoomCreatePreset, RoomID, UserID

from .store import PortalRow

ENCRYPTION_STATE = {
    "type": str(EventType.ROOM_ENCRYPTION),
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


async def create_portal_room(
    portal: PortalRow,
    *,
    creator: IntentAPI,
    bot: IntentAPI,
    state_store: PgStateStore,
    topic: str,
) -> RoomID:
    """Create the room. A DM is created by the correspondent's ghost (so it reads as a DM from
    them); group and list rooms by the bot. The bot is always a member with full power, so it can
    post notices and manage the room; the owner is invited."""
    log = logging.getLogger("bridge.portal").getChild(portal.id)
    is_dm = portal.kind == "dm"
    invitees = [UserID(portal.owner)]
    if creator.mxid != bot.mxid:
        invitees.append(bot.mxid)
    room_id = await creator.create_room(
        preset=RoomCreatePreset.PRIVATE,
        is_direct=is_dm,
        invitees=invitees,
        name=portal.name,
        topic=topic,
        initial_state=[ENCRYPTION_STATE],
        power_level_override={"users": _power_users(creator, bot, portal.owner)},
    )
    # The state store learns invitees and initial state from create_room, but not the creator.
    await state_store.joined(room_id, creator.mxid)
    if creator.mxid != bot.mxid:
        await bot.join_room_by_id(room_id)
    log.info("Created %s room %s for %s", portal.kind, room_id, portal.owner)
    return room_id


def _power_users(creator: IntentAPI, bot: IntentAPI, owner: str) -> dict[str, int]:
    # Since room version 12 the creator's power is implied, and listing it is an error. The
    # owner has full power in their own conversation; the bridge keeps what it needs (the bot,
    # and the ghost that created a DM) to manage ghosts and encryption.
    users = {bot.mxid: 100, owner: 100}
    users.pop(creator.mxid, None)
    return users


async def ensure_member(ghost: IntentAPI, bot: IntentAPI, room_id: RoomID) -> None:
    """A ghost joins before it speaks; the bot invites it when needed."""
    await ghost.ensure_joined(room_id, bot=bot)
