"""Sending and receiving room events through an encryption identity.

Everything the bridge posts goes through :class:`EncryptedSender`, so "replies in encrypted rooms
are always encrypted" is enforced in one place rather than remembered at every call site.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.errors import EncryptionError, MNotFound, SessionNotFound
from mautrix.types import (
    EncryptedEvent,
    EventID,
    EventType,
    Membership,
    MessageEvent,
    RoomID,
    Serializable,
    StateEvent,
)

from .account import CryptoAccount

# How long to wait for a Megolm session that the sender's to-device message has not delivered
# yet; in appservice mode it arrives in a later transaction, usually within a second.
SESSION_WAIT_SECONDS = 10


class EncryptedSender:
    def __init__(self, account: CryptoAccount, state_store: PgStateStore) -> None:
        self.account = account
        self.machine = account.machine
        self.state_store = state_store
        self.log = logging.getLogger("bridge.crypto.send")
        self._encrypt_locks: dict[RoomID, asyncio.Lock] = {}

    async def send(
        self,
        intent: IntentAPI,
        room_id: RoomID,
        content: Serializable | dict[str, Any],
        event_type: EventType = EventType.ROOM_MESSAGE,
        txn_id: str | None = None,
    ) -> EventID:
        """Send an event, encrypted whenever the room is encrypted."""
        if await self.is_encrypted(intent, room_id):
            content = await self._encrypt(room_id, event_type, content)
            event_type = EventType.ROOM_ENCRYPTED
        return await intent.send_message_event(room_id, event_type, content, txn_id=txn_id)

    async def is_encrypted(self, intent: IntentAPI, room_id: RoomID) -> bool:
        encrypted = await self.state_store.is_encrypted(room_id)
        if encrypted is None:
            # Not cached yet: ask the homeserver rather than guess "plaintext". Errors other
            # than "no such state" propagate, so nothing is sent in the clear by accident.
            try:
                await intent.get_state_event(room_id, EventType.ROOM_ENCRYPTION)
            except MNotFound:
                return False
            encrypted = await self.state_store.is_encrypted(room_id)
        return bool(encrypted)

    async def _encrypt(
        self, room_id: RoomID, event_type: EventType, content: Serializable | dict[str, Any]
    ) -> Serializable:
        # One encryption at a time per room: two concurrent ones could load the same stored
        # outbound session and emit two messages with the same Megolm index.
        async with self._encrypt_locks.setdefault(room_id, asyncio.Lock()):
            return await self._encrypt_locked(room_id, event_type, content)

    async def _encrypt_locked(
        self, room_id: RoomID, event_type: EventType, content: Serializable | dict[str, Any]
    ) -> Serializable:
        try:
            return await self.machine.encrypt_megolm_event(room_id, event_type, content)
        except EncryptionError:
            # No outbound session yet, or it was rotated by a membership or device change.
            # Invited members too: a message may arrive before its reader has joined.
            members = await self.state_store.get_members(
                room_id, memberships=(Membership.JOIN, Membership.INVITE)
            )
            await self.machine.share_group_session(room_id, members)
            return await self.machine.encrypt_megolm_event(room_id, event_type, content)

    async def decrypt(self, evt: EncryptedEvent) -> MessageEvent:
        try:
            return await self.machine.decrypt_megolm_event(evt)
        except SessionNotFound as e:
            self.log.debug("Waiting for session %s to decrypt %s", e.session_id, evt.event_id)
            if not await self.machine.wait_for_session(
                evt.room_id, e.session_id, timeout=SESSION_WAIT_SECONDS
            ):
                raise
            return await self.machine.decrypt_megolm_event(evt)

    async def handle_member_event(self, evt: StateEvent) -> None:
        """Rotate the room's outbound session when membership changes (a leaver loses access)."""
        await self.machine.handle_member_event(evt)
