"""The bridge's lifecycle: prepare → start → run until a signal → stop.

Owned here rather than inherited from mautrix.bridge, which is deprecated upstream.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import ClientError
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.errors import MatrixConnectionError, MatrixRequestError
from mautrix.util.async_db import Database

from . import __version__
from .config import Config
from .crypto import CryptoAccount, EncryptedSender
from .db import TxnLog, open_database
from .matrix.appservice import BridgeAppService
from .matrix.bot import Bot
from .matrix.handler import MatrixHandler
from .permissions import Permissions

# The bridge waits this long at most between attempts to reach a homeserver that is down.
MAX_RETRY_DELAY = 30


class Cloakroom:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = logging.getLogger("bridge")
        self.db: Database | None = None
        self.az: BridgeAppService | None = None
        self.crypto: CryptoAccount | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        self.log.info("Cloakroom %s starting", __version__)
        self.db = await open_database(cfg["database"])
        state_store = PgASStateStore(self.db)
        self.az = BridgeAppService(
            server=cfg["homeserver.address"],
            domain=cfg["homeserver.domain"],
            as_token=cfg["appservice.as_token"],
            hs_token=cfg["appservice.hs_token"],
            bot_localpart=cfg["appservice.bot_username"],
            id=cfg["appservice.id"],
            log="bridge.as",
            state_store=state_store,
            bridge_name="cloakroom",
            ephemeral_events=True,
            encryption_events=True,
            txn_log=TxnLog(self.db),
        )
        # The web server comes up first; transactions wait for `started` (see BridgeAppService).
        await self.az.start(cfg["appservice.hostname"], cfg["appservice.port"])
        await self._wait_for_homeserver()
        intent = self.az.intent
        await intent.ensure_registered()
        await intent.set_displayname(cfg["appservice.bot_displayname"])

        self.crypto = CryptoAccount(
            user_id=self.az.bot_mxid,
            homeserver=cfg["homeserver.address"],
            as_token=cfg["appservice.as_token"],
            pickle_key=cfg["encryption.pickle_key"],
            db=self.db,
            state_store=state_store,
            device_name="Cloakroom bridge bot",
        )
        await self.crypto.start()
        machine = self.crypto.machine
        self.az.otk_handler = self.crypto.handle_otk_counts
        self.az.device_list_handler = machine.handle_as_device_lists
        self.az.to_device_handler = machine.handle_as_to_device_event

        sender = EncryptedSender(self.crypto, state_store)
        bot = Bot(
            intent=intent,
            crypto=self.crypto,
            sender=sender,
            state_store=state_store,
            permissions=Permissions(cfg["permissions"], cfg["homeserver.domain"]),
            command_prefix=cfg["bridge.command_prefix"],
            homeserver_address=cfg["homeserver.address"],
            homeserver_domain=cfg["homeserver.domain"],
        )
        ghost_prefix = cfg["bridge.username_template"].partition("{address}")[0]
        self.handler = MatrixHandler(bot, sender, ghost_prefix, cfg["homeserver.domain"])
        self.az.matrix_event_handler(self.handler.dispatch)
        await TxnLog(self.db).prune()
        self.az.started.set()
        self.az.ready = True
        self.log.info("Cloakroom is running as %s", self.az.bot_mxid)

    async def _wait_for_homeserver(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.az.intent.versions()
                return
            except (MatrixConnectionError, MatrixRequestError, ClientError, OSError) as e:
                self.log.warning(
                    "Homeserver %s not reachable (%s); retrying in %.0f s",
                    self.config["homeserver.address"],
                    e,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)

    async def stop(self) -> None:
        self.log.info("Stopping")
        if self.az:
            await self.az.stop()
        if getattr(self, "handler", None):
            await self.handler.queues.drain()
        if self.crypto:
            await self.crypto.close()
        if self.db:
            await self.db.stop()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            await self.stop()
