"""The retention job: forget what the bridge no longer needs, and leave no copy of it on disk.

Every few hours it runs the prunes it was given — failed inbound deliveries, finished outbox
rows, the appservice transaction log — each with its own retention time. On SQLite it then
truncates the write-ahead log, and also every minute in between and whenever
:meth:`Retention.checkpoint_soon` is called (after a batch of deliveries, say): the WAL keeps the
page versions from before a delete, so a delivered mail's bytes only leave the disk with it.
On PostgreSQL the pruned tables are VACUUMed instead (see README: what stays until VACUUM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from mautrix.util.async_db import Database

from .db import checkpoint_wal, vacuum
from .worker import now_ms

# How often the prunes run. Retention times are days; a few hours late is nothing.
PRUNE_INTERVAL = 6 * 3600
# How often the WAL is truncated at the latest. Measured (bench in the commit message): a TRUNCATE
# checkpoint after every delete costs 40–60 % of insert+delete throughput, one per 100 deletes
# costs nothing (it even helps: a short WAL is faster), so once per batch or minute is cheap.
CHECKPOINT_INTERVAL = 60
# However often checkpoint_soon() is called, checkpoints are at least this far apart, so a stream
# of deliveries asking for one after each costs one every few seconds, not one per mail.
CHECKPOINT_MIN_GAP = 5

DAY_MS = 24 * 3600 * 1000

# Deletes what is older than the cutoff it is given (ms since the epoch); may return a count.
PruneFn = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class Prune:
    """One kind of row to forget after its retention time."""

    name: str  # what is forgotten, for the log ("failed inbound mail")
    run: PruneFn
    keep_ms: int  # how long rows are kept
    tables: tuple[str, ...] = ()  # what it deletes from: VACUUMed afterwards on PostgreSQL


class Retention:
    def __init__(
        self,
        db: Database,
        prunes: Sequence[Prune],
        *,
        prune_interval: float = PRUNE_INTERVAL,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        checkpoint_min_gap: float = CHECKPOINT_MIN_GAP,
    ) -> None:
        self.db = db
        self.prunes = list(prunes)
        self.prune_interval = prune_interval
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_min_gap = checkpoint_min_gap
        self.log = logging.getLogger("bridge.retention")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Prune now (start-up catches up on a bridge that was down), then periodically."""
        self._task = asyncio.create_task(self._run(), name="retention")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def checkpoint_soon(self) -> None:
        """Rows were just deleted: truncate the WAL now rather than within the minute.

        Calls are folded together: at most one checkpoint per CHECKPOINT_MIN_GAP seconds.
        """
        self._wake.set()

    async def prune_all(self) -> dict[str, object]:
        """Run every prune once, then clean up after them; what each one returned, by name."""
        results: dict[str, object] = {}
        pruned_tables: list[str] = []
        for prune in self.prunes:
            try:
                results[prune.name] = await prune.run(now_ms() - prune.keep_ms)
            except Exception:
                # One broken prune must not keep the others (or the checkpoint) from running.
                self.log.exception("Pruning %s failed", prune.name)
                continue
            pruned_tables += [t for t in prune.tables if t not in pruned_tables]
            if results[prune.name]:
                self.log.info("Pruned %s: %s", prune.name, results[prune.name])
        try:
            await vacuum(self.db, pruned_tables)
        except Exception:
            self.log.exception("VACUUM after pruning failed")
        await self.checkpoint()
        return results

    async def checkpoint(self) -> bool:
        """Truncate SQLite's WAL; False when it could not be done now (it is retried)."""
        try:
            return await checkpoint_wal(self.db)
        except Exception:
            self.log.exception("WAL checkpoint failed")
            return False

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time()
        while True:
            if loop.time() >= next_prune:
                await self.prune_all()  # checkpoints too
                next_prune = loop.time() + self.prune_interval
            else:
                await self.checkpoint()
            last_checkpoint = loop.time()
            timeout = max(0.0, min(self.checkpoint_interval, next_prune - last_checkpoint))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            if self._wake.is_set():
                # Asked early: keep the gap since the last one, folding in asks meanwhile.
                await asyncio.sleep(last_checkpoint + self.checkpoint_min_gap - loop.time())
                self._wake.clear()
