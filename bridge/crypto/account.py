"""One end-to-end encryption identity the bridge owns: a device, its Olm account, its cross-signing.

Appservice mode, no /sync: the device is created with MSC4190 (no /login), and the Olm machine is
fed from appservice transactions (to-device events, one-time key counts, device list changes).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string

import olm
from aiohttp import ClientError, ClientSession
from mautrix.client import Client
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmMachine, PgCryptoStore
from mautrix.crypto.signature import verify_signature_json
from mautrix.errors import MatrixError
from mautrix.types import (
    CrossSigningUsage,
    DeviceID,
    DeviceOTKCount,
    KeyID,
    UserID,
)
from mautrix.util.async_db import Database

from ..db import BridgeState
from .sealed import seal

# A transient failure to read our own cross-signing keys is retried this often before start-up
# gives up (never by replacing the keys).
CROSS_SIGNING_QUERY_ATTEMPTS = 4


class CryptoSetupError(Exception):
    """Start-up cannot continue; the message says what the admin should do."""


def new_device_id() -> DeviceID:
    alphabet = string.ascii_uppercase + string.digits
    return DeviceID("CLOAKROOM" + "".join(secrets.choice(alphabet) for _ in range(8)))


class CryptoAccount:
    """The E2EE identity of one Matrix user the bridge controls (today: the bot)."""

    def __init__(
        self,
        *,
        user_id: UserID,
        homeserver: str,
        as_token: str,
        pickle_key: str,
        db: Database,
        state_store: PgStateStore,
        device_name: str,
        client_session: ClientSession | None = None,
    ) -> None:
        self.user_id = user_id
        self.device_name = device_name
        self.log = logging.getLogger("bridge.crypto").getChild(user_id)
        self.state = BridgeState(db)
        # The client authenticates with the as_token and masquerades as the user (and, once the
        # device exists, as the device: MSC4190/MSC3202 identity assertion).
        self._owns_session = client_session is None
        self.client = Client(
            base_url=homeserver,
            mxid=user_id,
            token=as_token,
            log=self.log,
            client_session=client_session,
        )
        self._pickle_key = pickle_key
        self.store = PgCryptoStore(user_id, pickle_key, db)
        self.machine = OlmMachine(self.client, self.store, state_store, log=self.log)

    @property
    def device_id(self) -> DeviceID:
        return self.client.device_id

    @property
    def _state_prefix(self) -> str:
        return f"crypto:{self.user_id}"

    async def start(self) -> None:
        await self.store.open()
        device_id = DeviceID(await self.state.get(f"{self._state_prefix}:device_id") or "")
        if not device_id:
            # Remember the id before the homeserver knows it: a crash in between must not leave
            # an orphan device behind on the next start.
            device_id = new_device_id()
            await self.state.set(f"{self._state_prefix}:device_id", device_id)
        # PUT /devices/{id} is idempotent: it creates the device the first time, then only
        # refreshes its display name.
        await self.client.create_device_msc4190(device_id, self.device_name)
        try:
            await self.machine.load()
        except olm.OlmAccountError as e:
            raise CryptoSetupError(
                "encryption.pickle_key does not decrypt the keys in the database "
                f"({e}); restore the key the database was created with"
            ) from None
        await self.store.put_device_id(device_id)
        if self.machine.account.shared:
            await self._check_keys_on_server()
        if not self.machine.account.shared:
            await self.machine.share_keys()
        await self._ensure_cross_signed()
        self.log.info("Encryption ready with device %s", device_id)

    async def _check_keys_on_server(self) -> None:
        resp = await self.client.query_keys([self.user_id])
        device = resp.device_keys.get(self.user_id, {}).get(self.device_id)
        if device is None:
            # Someone deleted the device; PUT /devices brought it back without keys.
            self.log.warning("Device %s had no keys on the server, uploading again", self.device_id)
            self.machine.account.shared = False
            return
        if device.keys.get(KeyID.ed25519(self.device_id)) != self.machine.account.signing_key:
            raise CryptoSetupError(
                f"the homeserver has different keys for device {self.device_id} of "
                f"{self.user_id} than the bridge database; the database was probably replaced. "
                "Delete that device (e.g. with Synapse's admin API) and restart the bridge"
            )

    async def _ensure_cross_signed(self) -> None:
        # Ask the server, as a client would: the local trust cache only knows our signatures
        # if something happened to fetch our own keys, and a miss here would replace the
        # identity everyone has verified. So only a definite answer may lead to new keys: a
        # homeserver that cannot answer right now stops start-up (and it is retried).
        for attempt in range(CROSS_SIGNING_QUERY_ATTEMPTS):
            try:
                signed = await self._cross_signed_on_server()
                break
            except (MatrixError, ClientError, OSError, TimeoutError) as e:
                if attempt + 1 == CROSS_SIGNING_QUERY_ATTEMPTS:
                    raise CryptoSetupError(
                        f"cannot ask the homeserver for the cross-signing keys of "
                        f"{self.user_id} ({e}); not replacing them. Try again when it answers"
                    ) from None
                self.log.warning("Querying our cross-signing keys failed (%s); retrying", e)
                await asyncio.sleep(2**attempt)
        if signed:
            return
        # Publishes master, self-signing and user-signing keys (stored in SSSS under the
        # recovery key) and signs our device, so clients show it as verified by its owner.
        recovery_key = await self.machine.generate_recovery_key()
        # Kept in the database, sealed with the pickle key, never logged: it unlocks the
        # identity's private keys (an admin can use it to recover the bot's identity).
        await self.state.set(
            f"{self._state_prefix}:recovery_key",
            seal(self._pickle_key, "recovery_key", recovery_key),
        )
        self.log.info("Published cross-signing keys and signed device %s", self.device_id)

    async def is_cross_signed_on_server(self) -> bool:
        """Check, as a client would from /keys/query, that our device is signed by our identity.

        For display (`status`): an unanswered query counts as "no"."""
        try:
            return await self._cross_signed_on_server()
        except (MatrixError, ClientError, OSError, TimeoutError):
            self.log.exception("Failed to query own keys")
            return False

    async def _cross_signed_on_server(self) -> bool:
        """The homeserver's definite answer; raises when there is none."""
        resp = await self.client.query_keys([self.user_id])
        device = resp.device_keys.get(self.user_id, {}).get(self.device_id)
        master = resp.master_keys.get(self.user_id)
        self_signing = resp.self_signing_keys.get(self.user_id)
        if not (device and master and self_signing):
            return False
        master_key = next(iter(master.keys.values()))
        ssk_key = next(iter(self_signing.keys.values()))
        if CrossSigningUsage.SELF not in self_signing.usage:
            return False
        return verify_signature_json(
            self_signing.serialize(), self.user_id, master_key, master_key
        ) and verify_signature_json(device.serialize(), self.user_id, ssk_key, ssk_key)

    async def handle_otk_counts(
        self, otk_counts: dict[UserID, dict[DeviceID, DeviceOTKCount]]
    ) -> None:
        """Replenish our one-time keys when the homeserver says they are running low."""
        # Synapse also reports counts for the user's cross-signing keys (stored as hidden
        # "devices"); only our real device has one-time keys.
        count = otk_counts.get(self.user_id, {}).get(self.device_id)
        if count is not None:
            await self.machine.handle_otk_count(count)

    async def close(self) -> None:
        if self._owns_session:
            await self.client.api.session.close()

    @classmethod
    async def exists(cls, state: BridgeState, user_id: str) -> bool:
        """Whether this user has an identity in the database (without loading it)."""
        return bool(await state.get(f"crypto:{user_id}:device_id"))
