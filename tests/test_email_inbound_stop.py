"""InboundMail.stop(), as Cloakroom.stop calls it on SIGTERM: the real listener, queue and worker
from a real Config; the hub is a recorder (delivery is not what is tested here)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

from bridge.config import Config
from bridge.db import open_database
from bridge.email.inbound import InboundMail
from bridge.permissions import Permissions
from bridge.worker import IDLE_POLL_SECONDS

from .test_email_listener import TO_ALICE, code_and_text, connect, mail


class Hub:
    def __init__(self) -> None:
        self.jobs: list[Any] = []

    async def deliver(self, job: Any) -> None:
        self.jobs.append(job)

    async def readable(self, user_ids: list[str]) -> set[str]:
        return set(user_ids)  # everyone has a device: nothing is held


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _inbound(tmp_path: Path) -> tuple[InboundMail, int, list[str]]:
    port = _free_port()
    config = Config.from_text(
        "homeserver: {address: 'http://localhost:8008', domain: hs.test}\n"
        "appservice: {address: 'http://localhost:29400', as_token: a, hs_token: h}\n"
        "encryption: {pickle_key: p}\n"
        f"email: {{domain: bridge.test, listen: {{host: 127.0.0.1, port: {port}}},"
        " auth: {dns_servers: ['127.0.0.1'], dns_port: 9, dns_timeout: 0.2}}\n"
    )
    db = await open_database(f"sqlite:{tmp_path / 'bridge.db'}")
    asked: list[str] = []

    async def is_own_message_id(message_id: str) -> bool:
        asked.append(message_id)
        return False

    async def user_exists(user_id: str) -> bool | None:
        return True

    inbound = InboundMail(
        config=config,
        db=db,
        portals=Hub(),  # type: ignore[arg-type]
        permissions=Permissions({"hs.test": "user"}, "hs.test"),
        user_exists=user_exists,
        is_reserved_localpart=lambda localpart: False,
        is_own_message_id=is_own_message_id,
    )
    await inbound.start()
    return inbound, port, asked


async def _stop_during_data(
    inbound: InboundMail, port: int, stop: Any, bound: float = 15.0
) -> str:
    """Stop (``stop``: inbound.drain or inbound.stop) while one session is idle and another is
    inside DATA; check what each client hears."""
    async with connect(port) as idle, connect(port) as busy:
        await busy("mail", "bob@example.test")
        await busy("rcpt", TO_ALICE)
        await busy("putcmd", "data")
        assert (await busy("getreply"))[0] == 354  # the server is now inside DATA
        raw = mail()
        await busy("send", raw[:40])
        stopping = asyncio.create_task(stop())
        assert code_and_text(await idle("noop")) == (421, "4.3.2 Service shutting down")
        await busy("send", raw[40:] + b".\r\n")
        code, text = code_and_text(await busy("getreply"))
        assert code == 250 and text.startswith("2.0.0 Queued as "), text
        assert code_and_text(await busy("noop")) == (421, "4.3.2 Service shutting down")
        # Not a timing assertion: a bound on a hang (the drain itself waits at most 10 s).
        # asyncio.wait, not a timeout: cancelling stop() would be swallowed by DueWorker.stop.
        await asyncio.wait({stopping}, timeout=bound)
        if not stopping.done():
            raise TimeoutError(f"{stop.__name__}() still running after {bound} s")
    assert inbound.server is None
    return text.removeprefix("2.0.0 Queued as ")


async def test_drain_says_421_to_sessions_and_finishes_the_data_in_progress(
    tmp_path: Path,
) -> None:
    inbound, port, asked = await _inbound(tmp_path)
    db = inbound.queue.db
    try:
        queue_id = await _stop_during_data(inbound, port, inbound.drain)
        assert asked == ["<m1@example.test>"]  # the loop check asked the injected lookup
        await inbound.worker.stop()
        # Committed: still queued, or already handed to the hub by the worker.
        queued = await db.fetchval("SELECT COUNT(*) FROM inbound_message WHERE id=$1", queue_id)
        delivered = [job.queue_id for job in inbound.worker.portals.jobs]
        assert queued == 1 or delivered == [queue_id]
    finally:
        await inbound.worker.stop()
        await db.stop()


async def test_stop_returns_after_the_last_commit_woke_the_worker(tmp_path: Path) -> None:
    inbound, port, _ = await _inbound(tmp_path)
    try:
        await _stop_during_data(inbound, port, inbound.stop)
    finally:
        task = inbound.worker._loop._task
        if task is not None and not task.done():
            task.cancel()  # the swallowed cancel, again, so the test can end
            await asyncio.wait({task}, timeout=IDLE_POLL_SECONDS + 5)
        await inbound.queue.db.stop()
