"""Welcome, checkup and nudges: the bot's one encrypted DM with each local user.

The first time a permitted local user is seen (an event from them, or their first mail), the bot
opens one encrypted DM with their mailbox address and a security checkup. Later, when a session
of theirs appears without a cross-signature, it sends a short nudge there — at most one
unsolicited message per `nudge_interval_days`, never after `checkup off`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.types import (
    DeviceLists,
    Format,
    Membership,
    MessageType,
    RoomCreatePreset,
    RoomID,
    TextMessageEventContent,
    UserID,
)
from mautrix.util.async_db import Database

from ..crypto import EncryptedSender
from ..permissions import Permissions
from ..portal.rooms import ENCRYPTION_STATE
from ..worker import now_ms
from .checkup import Checkup, SecurityReport
from .local_users import LocalUser, LocalUserStore
from .report import render_nudge, render_report, render_welcome

DAY_MS = 24 * 3600 * 1000
# A user seen without any device is asked about again after this long at the earliest.
RECHECK_S = 300


class Onboarding:
    def __init__(
        self,
        *,
        db: Database,
        bot: IntentAPI,
        sender: EncryptedSender,
        state_store: PgStateStore,
        permissions: Permissions,
        checkup: Checkup,
        is_ours: Callable[[str], bool],
        welcome: bool,
        nudge_interval_days: float,
    ) -> None:
        self.users = LocalUserStore(db)
        self.bot = bot
        self.sender = sender
        self.state_store = state_store
        self.permissions = permissions
        self.checkup = checkup
        self.is_ours = is_ours
        self.welcome = welcome
        self.nudge_interval_ms = int(nudge_interval_days * DAY_MS)
        self.log = logging.getLogger("bridge.onboarding")
        # Users already greeted (or being greeted) by this process: the check on every event
        # must not cost a database query.
        self._greeted: set[str] = set()
        # Users found without a device that could read a welcome, and when: not asked again on
        # every event of theirs, only after RECHECK_S or a sign of a new device.
        self._no_device: dict[str, float] = {}
        # One piece of work per user at a time: a welcome, a nudge decision or a checkup.
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def eligible(self, user_id: str) -> bool:
        """A permitted local user, not the bot or one of our ghosts."""
        return (
            self.checkup.is_local(user_id)
            and not self.is_ours(user_id)
            and self.permissions.is_user(user_id)
        )

    def _lock(self, user_id: str) -> asyncio.Lock:
        return self._locks.setdefault(user_id, asyncio.Lock())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        # Transactions must be answered quickly: the work runs beside them, not inside.
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _say(self, room_id: RoomID, text: str, html_text: str) -> None:
        content = TextMessageEventContent(
            msgtype=MessageType.NOTICE, body=text, format=Format.HTML, formatted_body=html_text
        )
        await self.sender.send(self.bot, room_id, content)

    # The welcome -----------------------------------------------------------------------------

    async def seen(self, user_id: str, *, device_hint: bool = False) -> None:
        """A user did something the bridge saw. Cheap and never raises: called per event.

        ``device_hint``: they may just have got their first device (their held mail was
        released, or their device list changed), so look again even if we looked recently.
        """
        if not self.welcome or user_id in self._greeted or not self.eligible(user_id):
            return
        waiting_since = self._no_device.get(user_id)
        if not device_hint and waiting_since and time.monotonic() - waiting_since < RECHECK_S:
            return  # e.g. another appservice's puppet: don't ask the homeserver per event
        self._greeted.add(user_id)
        self._spawn(self._welcome(user_id))

    async def device_appeared(self, user_id: str) -> None:
        """Held mail was released for user_id: a device exists, and a held welcome may go."""
        await self.seen(user_id, device_hint=True)

    async def _welcome(self, user_id: str) -> None:
        try:
            async with self._lock(user_id):
                await self._welcome_locked(user_id)
        except Exception:
            # Forgotten, so the next event from them tries again.
            self._greeted.discard(user_id)
            self.log.exception("Failed to welcome %s", user_id)

    async def _welcome_locked(self, user_id: str) -> None:
        row = await self.users.get(user_id)
        if row and row.welcomed_at:
            return
        if row and row.checkup_off:
            # They opted out before we got to them; the welcome is unsolicited too.
            await self.users.set_welcomed(user_id, row.known_devices)
            return
        if not await self.sender.can_read(user_id):
            # No device could decrypt a welcome yet (mail came before their first login):
            # forgotten, so their first device (a device list change, their held mail being
            # released, or any event of theirs) brings it, encrypted to that device.
            self._greeted.discard(user_id)
            self._no_device[user_id] = time.monotonic()
            self.log.info("Not welcoming %s yet: no device that could read it", user_id)
            return
        self._no_device.pop(user_id, None)
        report = await self.checkup.report(user_id)
        # A DM created by an earlier attempt that failed before the message is reused.
        room_id = RoomID(row.dm_room_id) if row and row.dm_room_id else None
        if room_id is None:
            room_id = await self._create_dm(user_id)
            await self.users.set_dm(user_id, room_id)
        await self._say(room_id, *render_welcome(report, await self._display_name(user_id)))
        await self.users.set_welcomed(user_id, _ids(report))
        self.log.info("Welcomed %s in %s", user_id, room_id)

    async def _display_name(self, user_id: str) -> str:
        try:
            return (await self.bot.get_displayname(UserID(user_id))) or ""
        except Exception:
            return ""  # greeted by their user ID instead

    async def _create_dm(self, user_id: str) -> RoomID:
        room_id = await self.bot.create_room(
            preset=RoomCreatePreset.TRUSTED_PRIVATE,
            is_direct=True,
            invitees=[UserID(user_id)],
            topic="Cloakroom: your mailbox and encryption checkup",
            # Encrypted from the first event; the user is invited before anything is sent, so
            # the Megolm session is shared with their devices.
            initial_state=[ENCRYPTION_STATE],
        )
        # The state store learns invitees and initial state from create_room, not the creator.
        await self.state_store.joined(room_id, self.bot.mxid)
        return room_id

    # The checkup command ---------------------------------------------------------------------

    async def run_checkup(self, user_id: str) -> tuple[str, str]:
        """The report for a user who asked; what it lists no longer needs a nudge."""
        async with self._lock(user_id):
            report = await self.checkup.report(user_id)
            row = await self.users.get(user_id)
            if row and row.welcomed_at:
                await self._remember_devices(row, _ids(report), nudged=False)
        return render_report(report)

    async def set_reminders(self, user_id: str, on: bool) -> None:
        async with self._lock(user_id):
            await self.users.set_checkup_off(user_id, not on)

    async def _remember_devices(self, row: LocalUser, device_ids: list[str], nudged: bool) -> None:
        last = now_ms() if nudged else row.last_nudge_at
        await self.users.set_devices(row.user_id, device_ids, last)

    # Nudges ----------------------------------------------------------------------------------

    async def handle_device_lists(self, lists: DeviceLists) -> None:
        """Device list changes from a transaction (MSC3202): look for unverified new sessions."""
        for user_id in lists.changed or []:
            if self.eligible(user_id):
                # A first device may be what a held welcome waits for.
                await self.seen(user_id, device_hint=True)
                self._spawn(self._check_devices(user_id))

    async def _check_devices(self, user_id: str) -> None:
        try:
            async with self._lock(user_id):
                await self._check_devices_locked(user_id)
        except Exception:
            self.log.exception("Failed to check the new devices of %s", user_id)

    async def _check_devices_locked(self, user_id: str) -> None:
        row = await self.users.get(user_id)
        if not (row and row.welcomed_at and row.dm_room_id):
            return
        status = await self.checkup.devices(user_id)
        known = set(row.known_devices)
        fresh = [d for d in status.unsigned if d.device_id not in known]
        nudged = False
        # Opted out: the devices still become known, so `checkup on` starts from today.
        if fresh and not row.checkup_off and self._may_nudge(row) and await self._dm_open(row):
            await self._say(RoomID(row.dm_room_id), *render_nudge(fresh, status.identity))
            nudged = True
            self.log.info("Nudged %s about %s", user_id, [d.device_id for d in fresh])
        elif fresh:
            self.log.debug("Not nudging %s about %s: opted out, too soon or DM closed",
                           user_id, [d.device_id for d in fresh])
        # Devices seen now are known, nudged about or not: one nudge per device at most.
        await self._remember_devices(row, [d.device_id for d in status.devices], nudged)

    def _may_nudge(self, row: LocalUser) -> bool:
        return row.last_nudge_at is None or now_ms() - row.last_nudge_at >= self.nudge_interval_ms

    async def _dm_open(self, row: LocalUser) -> bool:
        """Whether the user is still in (or invited to) the DM: a message they left is lost."""
        membership = await self.state_store.get_membership(
            RoomID(row.dm_room_id), UserID(row.user_id)
        )
        return membership in (Membership.JOIN, Membership.INVITE)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))


def _ids(report: SecurityReport) -> list[str]:
    return [d.device_id for d in report.status.devices]
