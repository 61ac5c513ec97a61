"""The quickstart's stand-in for a real relay: outgoing mail is written to files, not sent.

A fresh local set-up has no smarthost; this keeps `make run` self-contained while showing exactly
what would leave: one .eml file per message in the sink directory.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class _Writer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**9}.eml"
        header = f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n".encode()
        (self.directory / name).write_bytes(header + (envelope.original_content or b""))
        return "250 2.0.0 Written to the quickstart's sent folder"


class MailSink:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        handler = _Writer(self.directory)

        async def serve() -> None:
            await self._loop.create_server(
                lambda: SMTP(handler, hostname="sink.localhost", decode_data=False),
                host="127.0.0.1",
                port=self.port,
            )

        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
