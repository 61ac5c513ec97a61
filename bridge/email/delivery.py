"""The delivery worker: queued mail → the hub, with backoff while the homeserver is away.

Each user's mail from one correspondent (or one list) is delivered in the order it arrived, so a
reply never overtakes the mail it answers; other conversations and users go in parallel.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable

from ..metrics import DELIVERIES, delivered
from ..portal import MailJob, NoReadableDevice, PortalManager
from ..worker import DueWorker, backoff_ms, now_ms
from .auth import AuthVerdict
from .holds import HeldReaders
from .queue import DueDelivery, InboundQueue

MAX_BACKOFF_MS = 10 * 60 * 1000
PARALLEL_CONVERSATIONS = 8


class DeliveryWorker:
    def __init__(self, queue: InboundQueue, portals: PortalManager, give_up_after_ms: int) -> None:
        self.queue = queue
        self.portals = portals
        self.give_up_after_ms = give_up_after_ms
        self.log = logging.getLogger("bridge.email.delivery")
        self._loop = DueWorker(self._round, queue.next_due_at, self.log)
        self._slots = asyncio.Semaphore(PARALLEL_CONVERSATIONS)
        # Told the user ID after each delivered mail, and when a user's held mail is released
        # (the app greets a user once they can read: the welcome waits for a device too).
        self.on_delivered: Callable[[str], Awaitable[None]] | None = None
        self.holds = HeldReaders(queue, portals.readable, self._released)

    def wake(self) -> None:
        self._loop.wake()

    def start(self) -> None:
        self.holds.start()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self.holds.stop()

    async def _released(self, user_id: str) -> None:
        self.wake()
        if self.on_delivered:
            await self.on_delivered(user_id)

    async def _round(self) -> bool:
        due = await self.queue.due(limit=200)
        if not due:
            return False
        by_conversation: dict[tuple[str, str], list[DueDelivery]] = defaultdict(list)
        for delivery in due:
            by_conversation[delivery.user_id, delivery.order_key].append(delivery)
        await asyncio.gather(
            *(self._deliver_in_order(items) for items in by_conversation.values())
        )
        return True

    async def _deliver_in_order(self, deliveries: list[DueDelivery]) -> None:
        async with self._slots:
            for delivery in deliveries:
                if not await self._deliver(delivery):
                    # Keep the order: the conversation's later mail waits for the failed one
                    # (or, when its reader has no device yet, is held with it).
                    return

    async def _deliver(self, d: DueDelivery) -> bool:
        verdict = AuthVerdict.from_json(d.auth) if d.auth else None
        job = MailJob(
            queue_id=d.queue_id,
            owner=d.user_id,
            recipient=d.recipient,
            tag=d.tag,
            raw=d.raw,
            warning_for=verdict.marker if verdict else None,
            standing_for=verdict.standing if verdict else None,
            envelope_from=d.mail_from,
            done_parts=await self.queue.done_parts(d.queue_id, d.user_id),
        )

        async def record(part: int, event_id: str) -> None:
            await self.queue.record_part(d.queue_id, d.user_id, part, event_id)

        job.record_part = record
        try:
            await self.portals.deliver(job)
        except NoReadableDevice:
            # Not a failure: the mail waits (without expiring) for its reader's first device.
            await self.holds.hold(d.user_id)
            DELIVERIES.labels("held").inc()
            return False
        except Exception as e:
            return await self._failed(d, e)
        await self.queue.finish(d.queue_id, d.user_id, "delivered")
        delivered(d.received_at)
        self.log.info("Delivered %s to %s", d.queue_id, d.user_id)
        if self.on_delivered:
            try:
                await self.on_delivered(d.user_id)
            except Exception:
                self.log.exception("After-delivery hook failed for %s", d.user_id)
        return True

    async def _failed(self, d: DueDelivery, error: Exception) -> bool:
        if now_ms() - d.received_at > self.give_up_after_ms:
            self.log.error(
                "Giving up on %s for %s after %d attempts: %s (kept in the queue)",
                d.queue_id, d.user_id, d.attempts + 1, error,
            )
            await self.queue.finish(d.queue_id, d.user_id, "failed", str(error))
            DELIVERIES.labels("failed").inc()
            return True
        delay = backoff_ms(d.attempts, MAX_BACKOFF_MS)
        self.log.warning(
            "Delivery of %s to %s failed (attempt %d): %s; retrying in %d s",
            d.queue_id, d.user_id, d.attempts + 1, error, delay // 1000,
            exc_info=d.attempts == 0,
        )
        await self.queue.retry_later(d.queue_id, d.user_id, delay, repr(error))
        DELIVERIES.labels("retried").inc()
        return False

