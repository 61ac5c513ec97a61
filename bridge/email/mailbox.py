"""Zero set-up mailboxes: every permitted local user has one. Checked at RCPT, before any data.

Answers are SMTP status strings. We never relay: anything that is not plainly
``localpart[+tag]@<email.domain>`` is refused, including the classic source-route and
percent-hack tricks that old MTAs forwarded.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mautrix.util.async_db import Database

from ..identifiers import parse_local_mailbox
from ..permissions import Permissions
from ..worker import now_ms

RELAY_DENIED = "550 5.7.1 Relaying denied: this server only accepts mail for its own mailboxes"
NO_SUCH_USER = "550 5.1.1 No such mailbox here"
NOT_ALLOWED = "550 5.7.1 This mailbox may not receive mail through this bridge"
TRY_LATER = "451 4.4.3 Cannot check this mailbox right now; try again later"
OK = "250 2.1.5 Recipient OK"

# How long an answer from the homeserver's user directory is reused, and how many are kept: a
# dictionary attack on RCPT meets a bounded cache, not a growing one.
EXISTS_TTL = 300.0
MISSING_TTL = 60.0
CACHE_SIZE = 10_000

# Characters that route mail elsewhere in some MTAs (percent hack, bang paths, source routes,
# quoted local parts hiding an @): never part of a mailbox of ours.
_ROUTING_CHARS = set('%!@:"\\ ,;<>()[]')


@dataclass(frozen=True)
class LocalRecipient:
    user_id: str
    recipient: str  # the address as it was sent to, domain lowercased
    tag: str


UserExists = Callable[[str], Awaitable[bool | None]]


class KnownMailboxes:
    """Users once confirmed to exist. While the homeserver is unreachable their mail is still
    accepted (and waits in the queue); mail for anyone else gets a temporary 451."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def remember(self, user_id: str) -> None:
        await self.db.execute(
            "INSERT INTO known_mailbox (user_id, verified_at) VALUES ($1, $2) "
            "ON CONFLICT (user_id) DO UPDATE SET verified_at=excluded.verified_at",
            user_id,
            now_ms(),
        )

    async def forget(self, user_id: str) -> None:
        await self.db.execute("DELETE FROM known_mailbox WHERE user_id=$1", user_id)

    async def is_known(self, user_id: str) -> bool:
        return bool(await self.db.fetchval("SELECT 1 FROM known_mailbox WHERE user_id=$1", user_id))


def _monotonic() -> float:
    return time.monotonic()  # looked up at each call, so tests can move time


class _ExistsCache:
    """user ID → exists, each answer for its TTL; least recently used entries go first."""

    def __init__(self, size: int, clock: Callable[[], float] = _monotonic) -> None:
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: str) -> bool | None:
        entry = self._entries.get(user_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._entries[user_id]
            return None
        self._entries.move_to_end(user_id)
        return entry[1]

    def put(self, user_id: str, exists: bool) -> None:
        ttl = EXISTS_TTL if exists else MISSING_TTL
        self._entries[user_id] = (self._clock() + ttl, exists)
        self._entries.move_to_end(user_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class RecipientCheck:
    def __init__(
        self,
        *,
        email_domain: str,
        homeserver_domain: str,
        permissions: Permissions,
        user_exists: UserExists,
        reserved_localparts: Callable[[str], bool],
        known: KnownMailboxes,
        cache_size: int = CACHE_SIZE,
    ) -> None:
        self.known = known
        self.email_domain = email_domain.lower()
        self.homeserver_domain = homeserver_domain
        self.permissions = permissions
        self._user_exists = user_exists
        self._reserved = reserved_localparts
        self._cache = _ExistsCache(cache_size)
        self.log = logging.getLogger("bridge.email.in")

    async def check(self, address: str) -> tuple[LocalRecipient | None, str]:
        local, at, domain = address.rpartition("@")
        if not at or not local or domain.lower() != self.email_domain:
            return None, RELAY_DENIED
        if _ROUTING_CHARS & set(local) or local.startswith("."):
            return None, RELAY_DENIED
        mailbox = parse_local_mailbox(local)
        if mailbox is None or self._reserved(mailbox.localpart):
            return None, NO_SUCH_USER
        user_id = f"@{mailbox.localpart}:{self.homeserver_domain}"
        if not self.permissions.is_user(user_id):
            return None, NOT_ALLOWED
        exists = await self._exists(user_id)
        if exists is None:
            return None, TRY_LATER
        if not exists:
            return None, NO_SUCH_USER
        recipient = f"{local}@{domain.lower()}"
        return LocalRecipient(user_id, recipient, mailbox.tag), OK

    async def _exists(self, user_id: str) -> bool | None:
        cached = self._cache.get(user_id)
        if cached is not None:
            return cached
        exists = await self._user_exists(user_id)
        if exists is None and await self.known.is_known(user_id):
            self.log.info("Homeserver unreachable; accepting mail for known user %s", user_id)
            return True
        if exists:
            await self.known.remember(user_id)
        elif exists is False:
            await self.known.forget(user_id)
        if exists is not None:
            # New users get mail within a minute; known users are not looked up on every RCPT.
            self._cache.put(user_id, exists)
        return exists
