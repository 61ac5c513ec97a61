"""Sending and receiving room events through an encryption identity.

Everything the bridge posts goes through :class:`EncryptedSender`, so "replies in encrypted rooms
are always encrypted" is enforced in one place rather than remembered at every call site.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmMachine
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
    TrustState,
    UserID,
)

from .account import CryptoAccount
from .identities import Identities

# How long to wait for a Megolm session that the sender's to-device message has not delivered
# yet; in appservice mode it arrives in a later transaction, usually within a second.
SESSION_WAIT_SECONDS = 10
# /keys/query asks about this many users at once at most.
KEYS_QUERY_BATCH = 100
# A device without one-time keys yet is asked for them this many times, this far apart.
OTK_ATTEMPTS = 4
OTK_RETRY_SECONDS = 1.0


class EncryptedSender:
    def __init__(
        self,
        identities: Identities,
        state_store: PgStateStore,
        *,
        require_encryption: bool = True,
        is_ours: Callable[[str], bool] = lambda _user: False,
    ) -> None:
        self.identities = identities
        self.account = identities.bot
        self.machine = identities.bot.machine  # decrypts: the bot is in every room we read
        self.state_store = state_store
        self.require_encryption = require_encryption
        self.is_ours = is_ours
        self.log = logging.getLogger("bridge.crypto.send")
        self._encrypt_locks: dict[tuple[str, RoomID], asyncio.Lock] = {}

    async def send(
        self,
        intent: IntentAPI,
        room_id: RoomID,
        content: Serializable | dict[str, Any],
        event_type: EventType = EventType.ROOM_MESSAGE,
        txn_id: str | None = None,
        allow_plaintext: bool = False,
    ) -> EventID:
        """Send an event as intent's user, encrypted by that user's own device.

        Plaintext is refused unless the admin set encryption.require: false, or the caller
        marks the one kind of message that may be plain: the notice explaining that a room's
        encryption is off (it carries nothing private).
        """
        if await self.is_encrypted(intent, room_id):
            async with self.identities.using(intent.mxid) as account:
                encrypted = await self._encrypt(account, room_id, event_type, content)
                # Sent as the identity's own device (MSC4190 device masquerading), not as the
                # bare appservice user: Synapse keeps the transaction ids of device requests
                # in its database, so a retry after a *homeserver* crash is still recognised
                # and a mail is never posted twice. (Without a device it only remembers them
                # in memory.) This also skips mautrix's client-side power-level lookups.
                return await account.client.send_message_event(
                    room_id, EventType.ROOM_ENCRYPTED, encrypted, txn_id=txn_id
                )
        if self.require_encryption and not allow_plaintext:
            raise PlaintextRefused(room_id)
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
        self,
        account: CryptoAccount,
        room_id: RoomID,
        event_type: EventType,
        content: Serializable | dict[str, Any],
    ) -> Serializable:
        # One encryption at a time per sender and room: two concurrent ones could load the
        # same stored outbound session and emit two messages with the same Megolm index.
        lock = self._encrypt_locks.setdefault((account.user_id, room_id), asyncio.Lock())
        async with lock:
            machine = account.machine
            try:
                return await machine.encrypt_megolm_event(room_id, event_type, content)
            except EncryptionError:
                await self._share_new_session(machine, room_id)
                return await machine.encrypt_megolm_event(room_id, event_type, content)

    async def _share_new_session(self, machine: OlmMachine, room_id: RoomID) -> None:
        """Start a Megolm session for the room's readers, as their devices are right now.

        Invited members count: a mail may arrive before its reader has joined. Our own users
        (bot, ghosts) never need to read what we send. The readers' devices are asked from the
        homeserver first rather than taken from the cache, so an identity that was not loaded
        when a device appeared still reaches it. And a session is never shared with nobody: a
        message nobody can decrypt now stays unreadable forever, even for a first device
        that appears later, so the caller is told to wait instead.
        """
        members = await self.state_store.get_members(
            room_id, memberships=(Membership.JOIN, Membership.INVITE)
        )
        readers = [UserID(m) for m in members if not self.is_ours(m)]
        await self.refresh_devices(readers)
        if not await self.readable(readers, refresh=False):
            raise NoReadableDevice(room_id, readers)
        await self._olm_sessions_ready(machine, readers)
        await machine.share_group_session(room_id, readers)

    async def _olm_sessions_ready(self, machine: OlmMachine, readers: list[UserID]) -> None:
        """Make sure each reader device can receive the room key, before it is shared.

        A device that signed in a moment ago may have published its device keys but not yet
        its one-time keys (Element uploads them in the background): mautrix then skips that
        device, and the message — say, the held mail released by that very login — stays
        unreadable on it for good. So claim them first, and try again briefly when a device
        has none yet.
        """
        for attempt in range(OTK_ATTEMPTS):
            missing: dict[UserID, dict] = {}
            for user_id in readers:
                devices = (await machine.crypto_store.get_devices(user_id)) or {}
                for device_id, device in devices.items():
                    if device.trust == TrustState.BLACKLISTED:
                        continue
                    if not await machine.crypto_store.has_session(device.identity_key):
                        missing.setdefault(user_id, {})[device_id] = device
            if not missing:
                return
            if attempt:
                await asyncio.sleep(OTK_RETRY_SECONDS)
            try:
                await machine._create_outbound_sessions(missing)
            except Exception:
                self.log.warning("Claiming one-time keys failed", exc_info=True)
        self.log.warning("No one-time keys from %s; they may miss this message", missing)

    # Who can read --------------------------------------------------------------------------

    async def refresh_devices(self, users: list[UserID]) -> None:
        """Ask the homeserver for these users' devices (and cross-signing keys) now.

        A device seen here for the first time counts as a device list change: every identity's
        session in the rooms shared with its owner is rotated, not only the bot's (which is
        all mautrix itself would do)."""
        machine = self.identities.bot.machine
        store = machine.crypto_store
        before = {u: set((await store.get_devices(u)) or ()) for u in users}
        for start in range(0, len(users), KEYS_QUERY_BATCH):
            async with machine._fetch_keys_lock:
                await machine._fetch_keys(
                    users[start : start + KEYS_QUERY_BATCH], include_untracked=True
                )
        for user_id in users:
            if set((await store.get_devices(user_id)) or ()) != before[user_id]:
                await self.identities.rotate_sessions_with(user_id)

    async def readable(self, users: list[UserID], *, refresh: bool = True) -> set[UserID]:
        """Those of users with at least one device that would be given the room keys."""
        if refresh:
            await self.refresh_devices(users)
        machine = self.identities.bot.machine
        minimum = self.identities.min_trust
        found: set[UserID] = set()
        for user_id in users:
            for device in ((await machine.crypto_store.get_devices(user_id)) or {}).values():
                if minimum <= TrustState.UNVERIFIED:
                    # share_with: all: any device not blacklisted, without cross-signing reads.
                    trust = device.trust
                else:
                    trust = await machine.resolve_trust(device)
                if trust != TrustState.BLACKLISTED and trust >= minimum:
                    found.add(user_id)
                    break
        return found

    async def can_read(self, user_id: str) -> bool:
        """Whether what we post now would reach a device of user_id.

        The cache is trusted when it already lists a device (it follows device list changes
        of everyone sharing a room with us); otherwise the homeserver is asked, since a user
        who shares no room with us yet — mail before their first login — is never reported.
        """
        user = UserID(user_id)
        cached = await self.identities.bot.machine.crypto_store.get_devices(user)
        return user in await self.readable([user], refresh=not cached)

    async def decrypt(
        self, evt: EncryptedEvent, wait: float = SESSION_WAIT_SECONDS
    ) -> MessageEvent:
        """Decrypt with the bot's identity; wait up to ``wait`` s for a session still coming."""
        try:
            return await self.machine.decrypt_megolm_event(evt)
        except SessionNotFound as e:
            if wait <= 0:
                raise
            self.log.debug("Waiting for session %s to decrypt %s", e.session_id, evt.event_id)
            if not await self.machine.wait_for_session(evt.room_id, e.session_id, timeout=wait):
                raise
            return await self.machine.decrypt_megolm_event(evt)

    async def request_key(self, evt: EncryptedEvent) -> None:
        """Ask the sender's devices to forward the Megolm key of an event we cannot decrypt.

        The bot's device was in the room when they wrote, so their client shared the session
        with it and re-shares it on request (Element does, for devices it shared with).
        """
        sender = UserID(evt.sender)
        devices = await self.machine.crypto_store.get_devices(sender)
        if not devices:
            await self.refresh_devices([sender])
            devices = await self.machine.crypto_store.get_devices(sender)
        if not devices:
            return
        content = evt.content
        self.log.info("Asking %s's devices for the key of %s", sender, evt.event_id)
        await self.machine.request_room_key(
            evt.room_id,
            content.sender_key or "",
            content.session_id,
            {sender: list(devices)},
            timeout=0,  # the answer arrives as a to-device message; the inbox waits for it
        )

    async def handle_member_event(self, evt: StateEvent) -> None:
        """Rotate every sender's outbound session when membership changes (a leaver loses
        access to what comes next; a newcomer gets the new session)."""
        prev = evt.prev_content.membership if evt.prev_content else Membership.LEAVE
        cur = evt.content.membership
        harmless = {(Membership.INVITE, Membership.JOIN), (Membership.BAN, Membership.LEAVE),
                    (Membership.LEAVE, Membership.BAN)}
        if prev == cur or (prev, cur) in harmless or self.is_ours(evt.state_key):
            return
        await self.identities.forget_outbound_sessions(evt.room_id)


class NoReadableDevice(Exception):
    """Nobody who should read this room has a device that could decrypt it yet."""

    def __init__(self, room_id: RoomID | None, users: list[UserID]) -> None:
        who = ", ".join(users) or "nobody"
        super().__init__(f"no device of {who} can decrypt yet; not encrypting to nobody")
        self.room_id = room_id
        self.users = users


class PlaintextRefused(Exception):
    """The room is not encrypted and encryption.require forbids speaking in it."""

    def __init__(self, room_id: RoomID) -> None:
        super().__init__(f"{room_id} is not encrypted; not sending plaintext (encryption.require)")
        self.room_id = room_id
