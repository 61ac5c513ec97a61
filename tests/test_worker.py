"""The shared worker loop survives a failing `next_due_at` and never sleeps through a wake-up."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge import worker as worker_module
from bridge.worker import DueWorker

# Only a bound on how long a broken loop may hang the test; nothing is timed.
HANG_BOUND = 10


@pytest.fixture(autouse=True)
def long_sleeps(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loop that missed its wake-up would sleep this long: far past HANG_BOUND.
    monkeypatch.setattr(worker_module, "IDLE_POLL_SECONDS", 3600.0)
    monkeypatch.setattr(worker_module, "ERROR_RETRY_SECONDS", 3600.0)


class Rounds:
    """A work_round that counts its calls and signals each one."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = asyncio.Condition()

    async def __call__(self) -> bool:
        async with self.changed:
            self.count += 1
            self.changed.notify_all()
        return False

    async def reach(self, n: int) -> None:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: self.count >= n), HANG_BOUND)


async def test_a_failing_next_due_at_does_not_kill_the_worker() -> None:
    rounds = Rounds()
    calls = 0

    async def next_due_at() -> int | None:
        nonlocal calls
        calls += 1
        raise ConnectionError("database is down")

    loop = DueWorker(rounds, next_due_at, logging.getLogger("test.worker"))
    loop.start()
    try:
        await rounds.reach(1)
        loop.wake()
        await rounds.reach(2)
        assert calls >= 1
        assert loop._task is not None and not loop._task.done()
    finally:
        await loop.stop()


async def test_a_wake_during_next_due_at_is_not_lost() -> None:
    rounds = Rounds()
    asking = asyncio.Event()
    answer = asyncio.Event()

    async def next_due_at() -> int | None:
        asking.set()
        await answer.wait()
        return None  # nothing scheduled: an idle sleep (an hour here)

    loop = DueWorker(rounds, next_due_at, logging.getLogger("test.worker"))
    loop.start()
    try:
        await asyncio.wait_for(asking.wait(), HANG_BOUND)
        loop.wake()  # new work arrives while the worker asks when work is due
        answer.set()
        await rounds.reach(2)
    finally:
        await loop.stop()


async def test_a_wake_during_a_round_is_not_lost() -> None:
    rounds = Rounds()
    in_round = asyncio.Event()
    proceed = asyncio.Event()

    async def work_round() -> bool:
        await rounds()
        if rounds.count == 1:
            in_round.set()
            await proceed.wait()
        return False

    async def next_due_at() -> int | None:
        return None

    loop = DueWorker(work_round, next_due_at, logging.getLogger("test.worker"))
    loop.start()
    try:
        await asyncio.wait_for(in_round.wait(), HANG_BOUND)
        loop.wake()  # a row committed after the round looked for work
        proceed.set()
        await rounds.reach(2)
    finally:
        await loop.stop()
