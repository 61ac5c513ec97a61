"""Conversations started from Matrix: the `new` command, and inviting a ghost into a DM."""

from __future__ import annotations

import logging

from mautrix.appservice import IntentAPI
from mautrix.errors import IntentError, MForbidden
from mautrix.types import EncryptionAlgorithm, EventType, RoomEncryptionStateEventContent, RoomID

from ..identifiers import normalize_address
from .portal import PortalManager, group_key
from .rooms import ensure_member
from .store import PortalRow

log = logging.getLogger("bridge.portal.start")


async def start_conversation(
    hub: PortalManager, owner: str, addresses: list[str], subject: str
) -> RoomID:
    """Find or create the portal for these correspondents; the owner is invited to it."""
    addresses = list(dict.fromkeys(normalize_address(a) for a in addresses))
    if len(addresses) == 1:
        kind, key, name = "dm", f"dm:{addresses[0]}", addresses[0]
    else:
        kind, key = "group", group_key(addresses)
        name = ", ".join(addresses[:3]) + (
            f" and {len(addresses) - 3} more" if len(addresses) > 3 else ""
        )
    portal = await hub.portals.get_or_create(owner, key, kind, name, addresses, subject)
    if subject and portal.subject != subject:
        await hub.portals.set_subject(portal.id, subject)
        portal.subject = subject
    room_id = await hub.ensure_room(portal)
    for address in addresses:
        ghost = await hub.ghosts.intent(address)
        await ensure_member(ghost, hub.bot, room_id)
    await hub.notify(
        room_id,
        f"Write here to email {', '.join(addresses)}"
        + (f" — the first message starts the thread “{subject}”." if subject else "."),
        None,
    )
    return room_id


async def adopt_dm(hub: PortalManager, owner: str, room_id: RoomID, address: str) -> None:
    """A user invited a ghost into a DM: the ghost joins, and the room becomes their portal."""
    ghost = await hub.ghosts.intent(address)
    await ghost.join_room_by_id(room_id)
    await hub.state_store.joined(room_id, ghost.mxid)
    portal = await hub.portals.get_or_create(owner, f"dm:{address}", "dm", address, [address])
    if portal.room_id != room_id:
        # The newest DM with this correspondent is the one mail goes to from now on.
        await hub.portals.set_room(portal.id, room_id)
    # The bot decrypts the owner's messages (ghosts have no devices), so it must be a member.
    await ghost.invite_user(room_id, hub.bot.mxid)
    await hub.bot.join_room_by_id(room_id)
    await hub.bot.get_state(room_id)
    if not await hub.state_store.is_encrypted(room_id):
        await _encrypt_or_explain(hub, ghost, room_id)
    await hub.notify(room_id, f"This room now emails {address}. Write here to send them mail.",
                     None)
    log.info("%s adopted %s as the DM portal with %s", owner, room_id, address)


async def _encrypt_or_explain(hub: PortalManager, ghost: IntentAPI, room_id: RoomID) -> None:
    content = RoomEncryptionStateEventContent(algorithm=EncryptionAlgorithm.MEGOLM_V1)
    for intent in (ghost, hub.bot):
        try:
            await intent.send_state_event(room_id, EventType.ROOM_ENCRYPTION, content)
            await hub.state_store.set_encryption_info(room_id, content)
            return
        except (MForbidden, IntentError):
            continue
    await hub.notify(
        room_id,
        "This room is not encrypted and I may not change that. Please turn encryption on: "
        "Room settings → Security & Privacy → Encrypted.",
        None,
    )


__all__ = ["PortalRow", "adopt_dm", "start_conversation"]
