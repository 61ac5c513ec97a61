"""A real SMTP relay for the tests (aiosmtpd in its own thread), that records what it receives.

Answers can be scripted per recipient: ``relay.script("bob@x", "451 4.3.0 busy", "451 …")``
makes the next RCPTs for bob@x get those answers, then the relay accepts again.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default

from aiosmtpd.smtp import SMTP, Envelope, Session

from bridge.quickstart.synapse import free_port


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=default)  # type: ignore[return-value]


class _Handler:
    def __init__(self, relay: TestRelay) -> None:
        self.relay = relay

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        with self.relay.lock:
            scripted = self.relay.scripts[address.lower()]
            answer = scripted.popleft() if scripted else None
        if answer:
            return answer
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.relay.lock:
            self.relay.received.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content)
            )
        return "250 2.0.0 Accepted"


class TestRelay:
    __test__ = False  # not a test class, despite the name

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.scripts: dict[str, deque[str]] = defaultdict(deque)
        self.lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> TestRelay:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    async def _serve(self) -> None:
        handler = _Handler(self)
        self._server = await self._loop.create_server(
            lambda: SMTP(handler, hostname="relay.test", decode_data=False),
            host="127.0.0.1",
            port=self.port,
        )

    def stop(self) -> None:
        async def close() -> None:
            if self._server:
                self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def down(self) -> None:
        """The relay is away: its port refuses connections until up() (tests/test_faults*)."""
        async def close() -> None:
            if self._server:
                # Only the listening socket: wait_closed() would wait for open sessions too.
                self._server.close()
                self._server = None

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)

    def up(self) -> None:
        """Listen again on the same port after down()."""
        if self._server is None:
            asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    def script(self, address: str, *answers: str) -> None:
        with self.lock:
            self.scripts[address.lower()].extend(answers)

    def find(self, predicate) -> list[Received]:
        with self.lock:
            return [r for r in self.received if predicate(r)]

    def wait_for(self, predicate, count: int = 1, timeout: float = 60) -> list[Received]:
        """Block until `count` received mails match; returns them all."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(predicate)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.2)
