"""What the delivery and outbound workers share: a loop that sleeps until work is due or it is
woken, and an exponential backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

# Even with nothing scheduled, look again this often (a row may have come from elsewhere).
IDLE_POLL_SECONDS = 30.0
# When the database cannot say when work is due (it is down), look again this soon.
ERROR_RETRY_SECONDS = 5.0


def now_ms() -> int:
    return int(time.time() * 1000)


def backoff_ms(attempts: int, cap_ms: int) -> int:
    """1 s, 2 s, 4 s … up to cap_ms."""
    return min(1000 * 2 ** min(attempts, 20), cap_ms)


class DueWorker:
    """Runs `work_round` until it reports no work, then sleeps until `next_due_at` or `wake()`.

    Neither step may end the loop: a worker that dies leaves accepted mail undelivered. And a
    `wake()` that comes while a round or `next_due_at` runs is kept, not slept through: the
    flag is cleared before the round looks for work, never after.
    """

    def __init__(
        self,
        work_round: Callable[[], Awaitable[bool]],
        next_due_at: Callable[[], Awaitable[int | None]],
        log: logging.Logger,
    ) -> None:
        self._work_round = work_round
        self._next_due_at = next_due_at
        self.log = log
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            # From here on a wake() is remembered: the round below may already be past the
            # row that caused it.
            self._wake.clear()
            try:
                worked = await self._work_round()
            except Exception:
                self.log.exception("Worker round failed")
                worked = False
            if not worked:
                await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        await self._sleep(await self._seconds_until_due())

    async def _seconds_until_due(self) -> float:
        try:
            next_due = await self._next_due_at()
        except Exception:
            self.log.exception("Could not read when work is due; trying again soon")
            return ERROR_RETRY_SECONDS
        timeout = IDLE_POLL_SECONDS
        if next_due is not None:
            timeout = min(timeout, max(0.0, (next_due - now_ms()) / 1000))
        return timeout

    async def _sleep(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancel() that lands
        # together with a wake-up, and stop() would then wait out the whole idle poll.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()
