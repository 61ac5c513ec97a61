"""Per-room work queues: strictly in order within a room, rooms in parallel."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from mautrix.types import RoomID


class RoomQueues:
    """Runs work for one room strictly in submission order, and rooms in parallel.

    Transactions must be acknowledged quickly, so their work is queued rather than awaited,
    without losing per-room order. Nothing queued here may wait long: the inbox
    (matrix.inbox) never waits for keys inside a room's queue.
    """

    def __init__(self) -> None:
        self._tails: dict[RoomID, asyncio.Task[None]] = {}
        self.log = logging.getLogger("bridge.mx.queue")

    def submit(self, room_id: RoomID, work: Coroutine[Any, Any, None]) -> None:
        previous = self._tails.get(room_id)
        task = asyncio.create_task(self._run_after(previous, work))
        self._tails[room_id] = task

        def forget(t: asyncio.Task[None]) -> None:
            if self._tails.get(room_id) is t:
                del self._tails[room_id]

        task.add_done_callback(forget)

    async def _run_after(
        self, previous: asyncio.Task[None] | None, work: Coroutine[Any, Any, None]
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await work
        except Exception:
            self.log.exception("Unhandled error in room work")

    async def drain(self) -> None:
        while self._tails:
            await asyncio.wait(list(self._tails.values()))
