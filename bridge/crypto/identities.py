"""Every sender the bridge controls has its own verified device: the bot, and each ghost.

Element flags messages "encrypted by a device not verified by its owner" when a bot's device
encrypts on behalf of ghosts. So each ghost gets its own device (MSC4190), its own Olm account in
the shared crypto store (keyed by its user ID), and its own cross-signing identity that signs
that device. Identities are created on a ghost's first send and loaded on demand, with only
the most recently used ones kept in memory, so thousands of ghosts stay cheap.

Transactions carry to-device events, one-time key counts and device list changes for all of
them; they are routed here by user ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import ClientSession
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.types import (
    ASToDeviceEvent,
    DeviceID,
    DeviceLists,
    DeviceOTKCount,
    TrustState,
    UserID,
)
from mautrix.util.async_db import Database

from ..db import BridgeState
from .account import CryptoAccount

# Loaded ghost identities kept in memory; the rest stay in the database until needed.
MAX_LOADED = 256

# encryption.share_with → the least trust a reader's device needs to be given room keys.
# "cross-signed" is Element's "exclude insecure devices" (MSC4153): signed by its owner's
# self-signing key, whether or not we have verified the owner.
MIN_TRUST = {"all": TrustState.UNVERIFIED, "cross-signed": TrustState.CROSS_SIGNED_UNTRUSTED}


class Identities:
    def __init__(
        self,
        *,
        bot: CryptoAccount,
        is_ghost: Callable[[str], bool],
        homeserver: str,
        as_token: str,
        pickle_key: str,
        db: Database,
        state_store: PgStateStore,
        client_session: ClientSession | None = None,
        max_loaded: int = MAX_LOADED,
        share_with: str = "all",
        is_ours: Callable[[str], bool] | None = None,
    ) -> None:
        self.bot = bot
        self.is_ghost = is_ghost
        # bridge.identifiers.OurUsers from the app; the same rule spelled out for unit tests.
        self._is_ours = is_ours or (lambda u: u == bot.user_id or is_ghost(u))
        self.state_store = state_store
        self.min_trust = MIN_TRUST[share_with]
        bot.machine.send_keys_min_trust = self.min_trust
        # Told which users' devices changed (after every identity has been told): held mail and
        # the welcome wait for a reader's first device.
        self.on_devices_changed: Callable[[list[str]], Awaitable[None]] | None = None
        self._args = dict(
            homeserver=homeserver,
            as_token=as_token,
            pickle_key=pickle_key,
            db=db,
            state_store=state_store,
            device_name="Cloakroom (email)",
            client_session=client_session,
        )
        self.state = BridgeState(db)
        self.db = db
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, CryptoAccount] = OrderedDict()
        # Identities being used right now are never evicted: a second copy loaded meanwhile
        # would hold its own in-memory Olm sessions, and the two would fork the ratchets.
        self._in_use: Counter[str] = Counter()
        self._locks: dict[str, asyncio.Lock] = {}
        self.log = logging.getLogger("bridge.crypto.identities")

    @property
    def loaded_count(self) -> int:
        return len(self._loaded)

    async def for_user(self, user_id: str) -> CryptoAccount:
        """The identity a message from user_id is encrypted with (created on first use)."""
        if user_id == self.bot.user_id or not self.is_ghost(user_id):
            return self.bot
        account = self._loaded.get(user_id)
        if account:
            self._loaded.move_to_end(user_id)
            return account
        async with self._locks.setdefault(user_id, asyncio.Lock()):
            account = self._loaded.get(user_id)
            if account is None:
                account = CryptoAccount(user_id=UserID(user_id), **self._args)
                await account.start()
                account.machine.send_keys_min_trust = self.min_trust
                self._loaded[user_id] = account
                await self._evict()
        self._locks.pop(user_id, None)
        return account

    @contextlib.asynccontextmanager
    async def using(self, user_id: str) -> AsyncIterator[CryptoAccount]:
        """The identity of user_id, kept loaded while the caller works with it."""
        account = await self.for_user(user_id)
        self._in_use[account.user_id] += 1
        try:
            yield account
        finally:
            self._in_use[account.user_id] -= 1
            if self._in_use[account.user_id] <= 0:
                del self._in_use[account.user_id]

    async def _evict(self) -> None:
        for user_id in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                return
            if self._in_use[user_id] > 0:
                continue
            await self._loaded.pop(user_id).close()

    async def _existing(self, user_id: str) -> CryptoAccount | None:
        """A ghost's identity if it has one; never creates one just because a message came."""
        if user_id == self.bot.user_id:
            return self.bot
        if user_id in self._loaded or await CryptoAccount.exists(self.state, user_id):
            return await self.for_user(user_id)
        return None

    # Transaction routing ---------------------------------------------------------------------

    async def handle_to_device(self, evt: ASToDeviceEvent) -> None:
        account = await self._existing(evt.to_user_id)
        if account is None or evt.to_device_id != account.device_id:
            self.log.debug("To-device event for unknown %s/%s", evt.to_user_id, evt.to_device_id)
            return
        async with self.using(account.user_id) as account:
            await account.machine.handle_as_to_device_event(evt)

    async def handle_otk_counts(
        self, otk_counts: dict[UserID, dict[DeviceID, DeviceOTKCount]]
    ) -> None:
        for user_id, devices in otk_counts.items():
            account = self._loaded.get(user_id) or (
                self.bot if user_id == self.bot.user_id else None
            )
            if account is None:
                # Not in memory: load it only if its one-time keys are running low.
                if min((c.signed_curve25519 for c in devices.values()), default=99) >= 25:
                    continue
                account = await self._existing(user_id)
                if account is None:
                    continue
            count = devices.get(account.device_id)
            if count is not None:
                await account.machine.handle_otk_count(count)

    async def handle_device_lists(self, device_lists: DeviceLists) -> None:
        """A reader's devices changed: every identity's next message must reach the new set.

        The device cache is shared by all accounts in the store, so one refresh (through the
        bot's machine) serves them all. But each identity (the bot and every ghost, loaded or
        not) has its own outbound Megolm session per room, shared with the devices it saw
        then: mautrix only rotates the refreshing machine's own. So every identity's session
        in the rooms shared with a changed user is dropped here, in the database, and the next
        message starts a fresh one, shared with the devices known at that moment (a new device
        gets a new session: that is what Element accepts without key forwarding). Any change
        counts, including new signatures: with share_with: cross-signed, a device its owner
        has just verified must get the next message.
        """
        changed = [u for u in device_lists.changed if not self._is_ours(u)]
        if not changed:
            return
        self.log.debug("Devices changed for %s", changed)
        try:
            async with self.bot.machine._fetch_keys_lock:
                await self.bot.machine._fetch_keys(changed, include_untracked=False)
        except Exception:
            self.log.exception("Refreshing the devices of %d user(s) failed", len(changed))
        for user_id in changed:
            await self.rotate_sessions_with(user_id)
        if self.on_devices_changed:
            try:
                await self.on_devices_changed(changed)
            except Exception:
                self.log.exception("Device change hook failed")

    async def resync_devices(self) -> int:
        """At start-up: catch up on device changes missed while the bridge was down.

        Synapse keeps only the events of a transaction it could not deliver; the device list
        changes (and to-device messages) that rode along are dropped. So a phone that signed in
        while the bridge was stopped would never be told of, and every identity would keep
        sharing its old session with the old devices. Ask again about everyone we track and
        rotate where their devices differ from what we stored. Returns how many changed.
        """
        users = [u for u in await self._tracked_users() if not self._is_ours(u)]
        before = await self._device_sets()
        machine = self.bot.machine
        for start in range(0, len(users), 100):
            try:
                async with machine._fetch_keys_lock:
                    await machine._fetch_keys(users[start : start + 100], include_untracked=True)
            except Exception:
                self.log.exception("Refreshing tracked users' devices failed")
        after = await self._device_sets()
        changed = [u for u in users if before.get(u, set()) != after.get(u, set())]
        for user_id in changed:
            await self.rotate_sessions_with(user_id)
        if changed:
            self.log.info("Devices of %d user(s) changed while we were away", len(changed))
        return len(changed)

    async def _tracked_users(self) -> list[str]:
        rows = await self.db.fetch("SELECT user_id FROM crypto_tracked_user")
        return [r["user_id"] for r in rows]

    async def _device_sets(self) -> dict[str, set[str]]:
        sets: dict[str, set[str]] = {}
        for row in await self.db.fetch("SELECT user_id, device_id FROM crypto_device"):
            sets.setdefault(row["user_id"], set()).add(row["device_id"])
        return sets


    async def rotate_sessions_with(self, user_id: str) -> None:
        """Every identity starts a new Megolm session in every room it shares with user_id."""
        await self.db.execute(
            "DELETE FROM crypto_megolm_outbound_session WHERE room_id IN "
            "(SELECT room_id FROM mx_user_profile WHERE user_id=$1)",
            user_id,
        )

    async def forget_outbound_sessions(self, room_id: str) -> None:
        """Membership changed: every identity starts a new Megolm session in this room."""
        await self.db.execute(
            "DELETE FROM crypto_megolm_outbound_session WHERE room_id=$1", room_id
        )

    async def close(self) -> None:
        for account in self._loaded.values():
            await account.close()
        self._loaded.clear()
