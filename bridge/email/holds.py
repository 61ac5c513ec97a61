"""Mail waiting for its reader: released the moment they have a device that can decrypt it.

Everyone on the homeserver has a mailbox before they ever log in, and mail encrypted to nobody
could never be read, not even by their first device. So such mail is *held* in the queue (see
``InboundQueue.hold_user``) and released as soon as a device appears. We learn of one three ways:

* device list changes in appservice transactions (MSC3202), for users who share a room with the
  bot or a ghost (the app passes them to :meth:`HeldReaders.hint`);
* the user joining a room of ours (also a hint);
* a backed-off ``/keys/query`` poll of the held users, because a brand-new user shares no room
  with us yet and no transaction will ever mention their devices. One query asks about every
  user that is due, so a thousand held mailboxes cost one request per round, not a thousand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..metrics import MAIL_HOLDS, MAIL_RELEASES
from ..worker import now_ms
from .queue import InboundQueue

# First re-check a few seconds after holding, then less and less often, up to every few minutes.
FIRST_CHECK_MS = 2_000
MAX_CHECK_MS = 5 * 60_000

Readable = Callable[[list[str]], Awaitable[set[str]]]


@dataclass
class _Check:
    due_ms: int
    delay_ms: int


class HeldReaders:
    def __init__(
        self,
        queue: InboundQueue,
        readable: Readable,
        on_released: Callable[[str], Awaitable[None]],
    ) -> None:
        self.queue = queue
        self._readable = readable
        self._on_released = on_released
        self._checks: dict[str, _Check] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.log = logging.getLogger("bridge.email.holds")

    @property
    def held(self) -> set[str]:
        return set(self._checks)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def hold(self, user_id: str) -> None:
        """Hold everything pending for user_id until a device of theirs appears."""
        count = await self.queue.hold_user(user_id)
        MAIL_HOLDS.inc(count)
        if user_id not in self._checks:
            self.log.info(
                "Holding %d mail(s) for %s until they have a device that can decrypt", count,
                user_id,
            )
            self._checks[user_id] = _Check(now_ms() + FIRST_CHECK_MS, FIRST_CHECK_MS)
            self._wake.set()

    def hint(self, user_ids: list[str]) -> None:
        """Something suggests these users may have a device now: check the held ones soon."""
        now = now_ms()
        for user_id in user_ids:
            check = self._checks.get(user_id)
            if check is not None:
                check.due_ms, check.delay_ms = now, FIRST_CHECK_MS
                self._wake.set()

    async def _run(self) -> None:
        await self._load()
        while True:
            try:
                await self._round()
            except Exception:
                self.log.exception("Checking held readers failed")
            await self._sleep()

    async def _load(self) -> None:
        # Held mail survives restarts in the queue; so does the watch for its readers.
        delay = 1.0
        while True:
            try:
                held = await self.queue.held_users()
                break
            except Exception:
                self.log.exception("Cannot read the held mailboxes; retrying in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60)
        for user_id in held:
            self._checks.setdefault(user_id, _Check(now_ms(), FIRST_CHECK_MS))

    async def _sleep(self) -> None:
        now = now_ms()
        due = min((c.due_ms for c in self._checks.values()), default=now + MAX_CHECK_MS)
        self._wake.clear()
        # asyncio.timeout rather than wait_for, which can swallow a cancel() (see worker.py).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, (due - now) / 1000)):
                await self._wake.wait()

    async def _round(self) -> None:
        now = now_ms()
        due = [u for u, c in self._checks.items() if c.due_ms <= now]
        if not due:
            return
        for user_id in due:
            check = self._checks[user_id]
            check.delay_ms = min(check.delay_ms * 2, MAX_CHECK_MS)
            check.due_ms = now + check.delay_ms
        for user_id in await self._readable(due):
            await self._release(user_id)

    async def _release(self, user_id: str) -> None:
        count = await self.queue.release_user(user_id)
        MAIL_RELEASES.inc(count)
        self._checks.pop(user_id, None)
        self.log.info("%s has a device now: releasing %d held mail(s)", user_id, count)
        try:
            await self._on_released(user_id)
        except Exception:
            self.log.exception("After-release hook failed for %s", user_id)
