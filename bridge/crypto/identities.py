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
import logging
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import ClientSession
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.types import ASToDeviceEvent, DeviceID, DeviceLists, DeviceOTKCount, UserID
from mautrix.util.async_db import Database

from ..db import BridgeState
from .account import CryptoAccount

# Loaded ghost identities kept in memory; the rest stay in the database until needed.
MAX_LOADED = 256


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
    ) -> None:
        self.bot = bot
        self.is_ghost = is_ghost
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
                self._loaded[user_id] = account
                await self._evict()
        self._locks.pop(user_id, None)
        return account

    async def _evict(self) -> None:
        while len(self._loaded) > self.max_loaded:
            _, oldest = self._loaded.popitem(last=False)
            await oldest.close()

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
        # The device cache is shared by all accounts in the store: one refresh serves them all.
        await self.bot.machine.handle_as_device_lists(device_lists)

    async def forget_outbound_sessions(self, room_id: str) -> None:
        """Membership changed: every identity starts a new Megolm session in this room."""
        await self.db.execute(
            "DELETE FROM crypto_megolm_outbound_session WHERE room_id=$1", room_id
        )

    async def close(self) -> None:
        for account in self._loaded.values():
            await account.close()
        self._loaded.clear()
