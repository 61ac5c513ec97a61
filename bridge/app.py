"""The bridge's lifecycle: prepare → start → run until a signal → stop.

Owned here rather than inherited from mautrix.bridge, which is deprecated upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import yarl
from aiohttp import ClientError
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.errors import MatrixConnectionError, MatrixRequestError, MForbidden, MNotFound
from mautrix.types import DeviceLists, UserID
from mautrix.util.async_db import Database

from . import __version__
from .config import Config
from .crypto import CryptoAccount, EncryptedSender, Identities
from .db import (
    BridgeState,
    DatabaseInUse,
    InstanceLock,
    TxnLog,
    acquire_instance_lock,
    open_database,
)
from .email.inbound import InboundMail
from .email.outbound import OutboundWorker, build_outbound
from .exitcodes import EXIT_CONFIG, EXIT_DATABASE
from .identifiers import OurUsers, is_ghost
from .matrix.appservice import BridgeAppService
from .matrix.bot import Bot
from .matrix.handler import MatrixHandler
from .metrics import (
    MetricsServer,
    QueueCollector,
    bridge_health,
    ghost_identities_gauge,
    start_metrics_server,
)
from .onboarding.checkup import Checkup
from .onboarding.guard import build_guard
from .onboarding.welcome import Onboarding
from .permissions import Permissions
from .portal import Ghosts, GhostStore, PortalManager
from .portal.outbox import Outbox
from .portal.outgoing import Outgoing, OutgoingSettings
from .retention import DAY_MS, Prune, Retention

# The bridge waits this long at most between attempts to reach a homeserver that is down.
MAX_RETRY_DELAY = 30
# On shutdown, work already taken from transactions gets this long to finish.
DRAIN_SECONDS = 15


def reopen_log_files() -> None:
    """Close and reopen every file the logging configuration writes to (SIGHUP)."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.FileHandler):
                with handler.lock or contextlib.nullcontext():
                    if handler.stream:
                        handler.stream.close()
                    handler.stream = handler._open()
    logging.getLogger("bridge").info("Reopened the log files")


class StartupError(Exception):
    """Start-up cannot continue; the message names what to fix."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _redact(url: str) -> str:
    parsed = yarl.URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


class Cloakroom:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.log = logging.getLogger("bridge")
        self.db: Database | None = None
        self.instance_lock: InstanceLock | None = None
        self.az: BridgeAppService | None = None
        self.crypto: CryptoAccount | None = None
        self.handler: MatrixHandler | None = None
        self.inbound: InboundMail | None = None
        self.outbound: OutboundWorker | None = None
        self.onboarding: Onboarding | None = None
        self._stopping = asyncio.Event()
        self.retention: Retention | None = None
        self.metrics: MetricsServer | None = None

    async def start(self) -> None:
        self.log.info("Cloakroom %s starting", __version__)
        await self._open_database()
        state_store = PgASStateStore(self.db)
        await self._start_appservice(state_store)
        await self._wait_for_homeserver()
        intent = self.az.intent
        await intent.ensure_registered()
        await intent.set_displayname(self.config["appservice.bot_displayname"])
        await self._start_crypto(state_store)
        # Before any message is encrypted: devices that appeared while we were down.
        await self.identities.resync_devices()
        self._start_hub(state_store)
        # Rows from before sealing existed: their plaintext leaves the database now.
        await self.hub.messages.seal_plain_rows()
        await self.hub.portals.seal_plain_rows()
        self._start_handlers(state_store)
        await self._start_email()
        self._start_onboarding(state_store)
        self._start_retention()
        await self._start_metrics()
        # From here on, transactions that waited for start-up are processed.
        # Events recorded before an earlier run could handle them are picked up first.
        await self.handler.start()
        self.az.started.set()
        self.az.ready = True
        await self._ping_homeserver()
        self.log.info("Cloakroom is running as %s", self.az.bot_mxid)

    async def _ping_homeserver(self) -> None:
        """Tell the homeserver we are back, so it sends what it queued now, rather than after
        its retry back-off (minutes, after an outage). Its ping also checks hs_token both ways."""
        try:
            took = await self.az.ping_self()
            self.log.info("The homeserver reached us in %d ms", took)
        except Exception as e:
            self.log.warning("Appservice ping failed (%s); the homeserver will retry on its own", e)

    async def _open_database(self) -> None:
        url = self.config["database"]
        try:
            # Before the schema is touched: a second bridge on this database stops here.
            self.instance_lock = await acquire_instance_lock(url)
            self.db = await open_database(url)
        except DatabaseInUse as e:
            raise StartupError(EXIT_DATABASE, str(e)) from e
        except Exception as e:
            raise StartupError(EXIT_DATABASE, f"database: cannot open {_redact(url)}: {e}") from e

    async def _start_appservice(self, state_store: PgASStateStore) -> None:
        cfg = self.config
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

    async def _start_crypto(self, state_store: PgASStateStore) -> None:
        cfg = self.config
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
        template, domain = cfg["bridge.username_template"], cfg["homeserver.domain"]
        self.is_ghost = lambda user_id: is_ghost(template, user_id, domain)
        self.is_ours = OurUsers(self.az.bot_mxid, template, domain)
        self.identities = Identities(
            bot=self.crypto,
            is_ghost=self.is_ghost,
            homeserver=cfg["homeserver.address"],
            as_token=cfg["appservice.as_token"],
            pickle_key=cfg["encryption.pickle_key"],
            db=self.db,
            state_store=state_store,
            client_session=self.az.http_session,
            share_with=cfg["encryption.share_with"],
            is_ours=self.is_ours,
        )
        # Transactions carry crypto traffic for the bot and every ghost: route it by user.
        self.az.otk_handler = self.identities.handle_otk_counts
        self.az.device_list_handler = self.identities.handle_device_lists
        self.az.to_device_handler = self.identities.handle_to_device

    def _start_hub(self, state_store: PgASStateStore) -> None:
        cfg = self.config
        self.sender = EncryptedSender(
            self.identities,
            state_store,
            require_encryption=cfg["encryption.require"],
            is_ours=self.is_ours,
        )
        self.permissions = Permissions(cfg["permissions"], cfg["homeserver.domain"])
        ghosts = Ghosts(
            intent_for=self.az.intent.user,
            store=GhostStore(self.db),
            template=cfg["bridge.username_template"],
            domain=cfg["homeserver.domain"],
        )
        self.outbox = Outbox(self.db, cfg["encryption.pickle_key"])
        self.hub = PortalManager(
            db=self.db,
            bot=self.az.intent,
            ghosts=ghosts,
            sender=self.sender,
            state_store=state_store,
            email_domain=cfg.email_domain,
            collapse_quotes=cfg["email.collapse_quotes"],
            pickle_key=cfg["encryption.pickle_key"],
            threads=cfg["email.threads"],
        )
        self.outgoing = Outgoing(
            bot=self.az.intent,
            outbox=self.outbox,
            messages=self.hub.messages,
            state=BridgeState(self.db),
            settings=OutgoingSettings(
                email_domain=cfg.email_domain,
                relay_configured=bool(cfg["email.relay.host"]),
                rate_limit=cfg["email.outbound.rate_limit"],
                rate_window_ms=int(cfg["email.outbound.rate_window_seconds"] * 1000),
                edits=cfg["email.outbound.edits"],
                may_send=self.permissions.is_user,
                max_recipients=cfg["email.outbound.max_recipients"],
            ),
            notify=self.hub.notify,
            on_queued=lambda: self.outbound.wake() if self.outbound else None,
        )

    def _start_handlers(self, state_store: PgASStateStore) -> None:
        cfg = self.config
        bot = Bot(
            intent=self.az.intent,
            crypto=self.crypto,
            sender=self.sender,
            state_store=state_store,
            permissions=self.permissions,
            command_prefix=cfg["bridge.command_prefix"],
            homeserver_address=cfg["homeserver.address"],
            homeserver_domain=cfg["homeserver.domain"],
            hub=self.hub,
        )
        self.handler = MatrixHandler(
            bot, self.sender, self.hub, self.outgoing, cfg["bridge.username_template"],
            cfg["homeserver.domain"],
            db=self.db,
            undecryptable_after_seconds=cfg["bridge.undecryptable_after_seconds"],
        )
        # The encryption guard (None when off); its notice is the one thing the bot may say in
        # the clear: the room is unencrypted until right after it.
        guard = build_guard(
            cfg, self.az.intent, self.permissions, self.db,
            notify=lambda room, text, html: bot.notice(room, text, html, plain_ok=True),
            command_prefix=cfg["bridge.command_prefix"],
        )
        self.handler.guard = bot.guard = guard
        self.az.matrix_event_handler(self.handler.dispatch)

    async def _start_email(self) -> None:
        cfg = self.config
        ghost_prefix = cfg["bridge.username_template"].partition("{address}")[0]
        self.inbound = InboundMail(
            config=cfg,
            db=self.db,
            portals=self.hub,
            permissions=self.permissions,
            user_exists=self._user_exists,
            is_reserved_localpart=lambda lp: lp == cfg["appservice.bot_username"]
            or lp.startswith(ghost_prefix),
            # A loop is mail carrying a Message-ID we generated, nothing else.
            is_own_message_id=self.outbox.knows_message_id,
        )
        await self.inbound.start()
        self.outbound = build_outbound(cfg, self.outbox, self.hub)
        if self.outbound:
            await self.outbound.start()
        else:
            self.log.warning("email.relay.host is empty: mail written in Matrix is not sent")

    def _start_onboarding(self, state_store: PgASStateStore) -> None:
        """Welcome DMs, the `checkup` command and nudges about unverified sessions."""
        cfg = self.config
        domain = cfg["homeserver.domain"]
        onboarding = self.onboarding = Onboarding(
            db=self.db,
            bot=self.az.intent,
            sender=self.sender,
            state_store=state_store,
            permissions=self.permissions,
            checkup=Checkup(
                self.az.intent,
                domain=domain,
                email_domain=cfg.email_domain,
                # Only the guard's namespace lets the bot ask about a user's key backup as them.
                act_as_users=cfg["onboarding.guard"] != "off",
            ),
            is_ours=self.is_ours,
            welcome=cfg["onboarding.welcome"],
            nudge_interval_days=cfg["onboarding.nudge_interval_days"],
        )
        self.handler.onboarding = onboarding
        self.handler.bot.onboarding = onboarding  # read by the `checkup` command
        self.inbound.worker.on_delivered = onboarding.device_appeared
        # Mail (and the welcome) for someone without a device waits for their first one: a
        # device list change or a join of theirs is the moment to look again.
        holds = self.inbound.worker.holds

        async def devices_changed(users: list[str]) -> None:
            holds.hint(users)

        async def user_joined(user_id: str, room_id: str) -> None:
            holds.hint([user_id])

        self.identities.on_devices_changed = devices_changed
        self.handler.on_user_joined = user_joined
        crypto_device_lists = self.az.device_list_handler

        async def device_lists(lists: DeviceLists) -> None:
            # The crypto layer and the checkup both need every device list change.
            try:
                if crypto_device_lists:
                    await crypto_device_lists(lists)
            finally:
                await onboarding.handle_device_lists(lists)

        self.az.device_list_handler = device_lists

    async def _user_exists(self, user_id: str) -> bool | None:
        """Whether a local Matrix user exists, for RCPT checks; None when we cannot tell now."""
        try:
            await self.az.intent.get_profile(UserID(user_id))
            return True
        except MNotFound:
            return False
        except MForbidden:
            # Profile lookups restricted to users sharing a room: the user exists.
            return True
        except MatrixRequestError as e:
            if e.http_status == 404:
                # Synapse answers 404 with M_NOT_FOUND or M_UNKNOWN ("No row found").
                return False
            self.log.warning("Could not check whether %s exists: %r", user_id, e)
            return None
        except (MatrixConnectionError, ClientError, OSError) as e:
            self.log.warning("Could not check whether %s exists: %r", user_id, e)
            return None

    def _start_retention(self) -> None:
        """Forget what is no longer needed: old failures, sent mail's rows, transaction ids."""
        keep_ms = int(self.config["email.retention_days"] * DAY_MS)
        txn_log = TxnLog(self.db)
        self.retention = Retention(self.db, [
            Prune("transaction log", txn_log.prune, TxnLog.RETENTION_MS, ("appservice_txn",)),
            Prune("failed inbound mail", self.inbound.queue.prune_failed, keep_ms,
                  ("inbound_message", "inbound_delivery", "delivered_part")),
            Prune("outbox", self.outbox.prune, keep_ms, ("outbox",)),
            Prune("digests of mail taken", self.inbound.queue.prune_seen, keep_ms,
                  ("inbound_seen",)),
        ])
        self.retention.start()

    async def _start_metrics(self) -> None:
        """/metrics and /health on their own listener (metrics.listen; port 0: off)."""
        cfg = self.config
        host, port = cfg["metrics.listen.host"], cfg["metrics.listen.port"]
        if not port:
            return
        timeout = float(cfg["metrics.timeout"])
        try:
            self.metrics = await start_metrics_server(
                host,
                port,
                bridge_health(homeserver=cfg["homeserver.address"], db=self.db, timeout=timeout),
                [
                    QueueCollector(self.db, timeout),
                    ghost_identities_gauge(lambda: self.identities.loaded_count),
                ],
                timeout=timeout,
            )
        except OSError as e:
            raise StartupError(
                EXIT_CONFIG, f"metrics.listen: cannot listen on {host}:{port}: {e.strerror or e}"
            ) from e

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
        if self.retention:
            await self.retention.stop()
        if self.metrics:
            await self.metrics.stop()
        if self.inbound:
            await self.inbound.stop()
        if self.outbound:
            await self.outbound.stop()
        if self.az:
            await self.az.stop_server()
        if self.onboarding:
            await self.onboarding.stop()
        if self.handler:
            try:
                await asyncio.wait_for(self.handler.queues.drain(), DRAIN_SECONDS)
            except TimeoutError:
                self.log.warning("Gave up waiting for room work after %d s", DRAIN_SECONDS)
            await self.handler.stop()
        if self.az:
            await self.az.stop()
        if getattr(self, "identities", None):
            await self.identities.close()
        if self.crypto:
            await self.crypto.close()
        if self.db:
            await self.db.stop()
        if self.instance_lock:
            await self.instance_lock.release()

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        # logrotate's postrotate (or `systemctl reload`): write to a fresh file at the path.
        loop.add_signal_handler(signal.SIGHUP, reopen_log_files)
        starting = asyncio.create_task(self.start())
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            # A stop request must also interrupt a start-up that waits for the homeserver.
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
                await stopping
            else:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        finally:
            stopping.cancel()
            await self.stop()
