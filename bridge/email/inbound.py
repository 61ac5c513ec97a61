"""Email in, assembled: listener → durable queue → delivery worker → the hub."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mautrix.util.async_db import Database

from ..config import Config
from ..permissions import Permissions
from ..portal import PortalManager
from ..portal.outbox import Outbox
from .auth import AuthConfig, Authenticator
from .delivery import DeliveryWorker
from .listener import DRAIN_SECONDS, InboundHandler, IsOwnMessageId, Sessions, start_listener
from .mailbox import KnownMailboxes, RecipientCheck, UserExists
from .policy import PolicyServer, recipient_status
from .queue import InboundQueue
from .ratelimit import SlidingWindow


class InboundMail:
    def __init__(
        self,
        *,
        config: Config,
        db: Database,
        portals: PortalManager,
        permissions: Permissions,
        user_exists: UserExists,
        is_reserved_localpart: Callable[[str], bool],
        is_own_message_id: IsOwnMessageId | None = None,
    ) -> None:
        self.config = config
        self.queue = InboundQueue(db, pickle_key=config["encryption.pickle_key"])
        self.worker = DeliveryWorker(
            self.queue,
            portals,
            give_up_after_ms=int(config["email.delivery.give_up_after_hours"] * 3600 * 1000),
        )
        lmtp = config["email.listen.protocol"] == "lmtp"
        exempt = config["email.rate_limit.exempt_networks"] or []
        self.sessions = Sessions(
            max_connections=config["email.listen.max_connections"],
            per_ip=SlidingWindow(config["email.listen.connections_per_ip_per_minute"], 60.0),
            exempt=exempt,
        )
        self.handler = InboundHandler(
            recipients=RecipientCheck(
                email_domain=config.email_domain,
                homeserver_domain=config["homeserver.domain"],
                permissions=permissions,
                user_exists=user_exists,
                reserved_localparts=is_reserved_localpart,
                known=KnownMailboxes(db),
            ),
            queue=self.queue,
            authenticator=Authenticator(AuthConfig.from_config(config)),
            reject_dmarc_failures=config["email.auth.reject_dmarc_failures"],
            max_recipients=config["email.max_recipients"],
            per_sender=SlidingWindow(config["email.rate_limit.per_sender_per_hour"]),
            per_recipient=SlidingWindow(config["email.rate_limit.per_recipient_per_hour"]),
            per_null_sender_ip=SlidingWindow(
                config["email.rate_limit.null_sender_per_ip_per_hour"]
            ),
            # A loop is mail carrying a Message-ID the bridge generated: the outbox knows them.
            is_own_message_id=is_own_message_id or Outbox(db).knows_message_id,
            max_header_size=config["email.max_header_size"],
            hold_max_messages=config["email.hold.max_messages"],
            hold_max_bytes=config["email.hold.max_bytes"],
            sessions=self.sessions,
            lmtp=lmtp,
            on_queued=self.worker.wake,
        )
        self.server: asyncio.AbstractServer | None = None
        # Postfix in front asks this at RCPT: the listener's own answer, before it queues.
        self.policy = PolicyServer(recipient_status(self.handler), domain=config.email_domain)
        self.log = logging.getLogger("bridge.email.in")

    async def start(self) -> None:
        cfg = self.config
        self.worker.start()
        self.server = await start_listener(
            self.handler,
            host=cfg["email.listen.host"],
            port=cfg["email.listen.port"],
            lmtp=cfg["email.listen.protocol"] == "lmtp",
            max_size=cfg["email.max_size"],
            hostname=cfg.email_domain,
            tls_cert=cfg["email.listen.tls_cert"],
            tls_key=cfg["email.listen.tls_key"],
        )
        self.log.info(
            "Accepting %s for @%s on %s:%d",
            cfg["email.listen.protocol"].upper(),
            cfg.email_domain,
            cfg["email.listen.host"],
            cfg["email.listen.port"],
        )
        if policy_port := cfg["email.policy.listen.port"]:
            await self.policy.start(cfg["email.policy.listen.host"], policy_port)

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Stop taking mail without losing any: new connections and idle sessions get
        ``421 4.3.2``, a DATA in progress is finished and answered, then the listener closes.
        Waits at most ``timeout`` seconds for sessions in progress."""
        if self.server is None:
            return
        await self.sessions.drain(timeout)
        self.server.close()
        await self.server.wait_closed()
        self.server = None
        self.log.info("Stopped accepting mail")

    async def stop_accepting(self) -> None:
        await self.drain()

    async def stop(self) -> None:
        await self.drain()
        # After the drain: Postfix keeps queueing (its policy answers go on) until then.
        await self.policy.stop()
        await self.worker.stop()
