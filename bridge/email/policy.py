"""A Postfix policy delegation server: Postfix asks it, at RCPT, whether the bridge takes a mailbox.

Postfix in front of the bridge must not accept mail the bridge would refuse: it would have to
bounce it later, to a sender address that is often forged (backscatter). So Postfix's
``smtpd_recipient_restrictions`` say ``check_policy_service inet:127.0.0.1:PORT`` and this server
answers with the listener's own RCPT decision (the same :class:`RecipientCheck`, held-mail quota
and per-mailbox rate limit): ``action=DUNNO`` for a mailbox the bridge takes, else the status the
listener would give (``action=550 5.1.1 ...``, ``action=452 4.2.2 ...``, ``action=451 ...``).

The protocol (http://www.postfix.org/SMTPD_POLICY_README.html): a request is ``name=value``
lines ended by an empty line; the answer is ``action=...`` and an empty line. Postfix keeps the
connection for further requests. Anything else — an over-long line, too many attributes, a line
without ``=``, a request that stalls — closes the connection; Postfix then answers its client
with a temporary error, so nothing is accepted that was not checked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .listener import MAILBOX_FULL

if TYPE_CHECKING:
    from .listener import InboundHandler

# The listener's status when a check itself goes wrong: the sender retries, nothing is lost.
CHECK_FAILED = "451 4.3.0 Temporary failure; try again later"
CHECK_TOO_SLOW = "451 4.4.3 Cannot check this mailbox right now; try again later"

# Postfix sends about 30 short attributes; helo_name and the addresses are bounded by SMTP's own
# line limits. Both bounds are generous, and keep a misbehaving client to a few hundred KiB.
MAX_LINE = 4096
MAX_ATTRIBUTES = 100
# Postfix closes a policy connection idle for smtpd_policy_service_max_idle (300 s): wait a bit
# longer than that, so it is always Postfix that closes an idle connection, never us mid-reuse.
IDLE_TIMEOUT = 330.0
# Once a request has begun, all of it arrives at once (Postfix writes it in one go).
REQUEST_TIMEOUT = 10.0
# Answer before Postfix's smtpd_policy_service_timeout (100 s) would turn our slowness into its
# own "451 4.3.5 Server configuration problem".
CHECK_TIMEOUT = 30.0
# One connection per smtpd process; Postfix's default_process_limit is 100.
MAX_CONNECTIONS = 256

log = logging.getLogger("bridge.email.policy")

# recipient address → the SMTP status the bridge would answer at RCPT.
RecipientStatus = Callable[[str], Awaitable[str]]


class ProtocolError(Exception):
    """The client did not speak the policy protocol; the connection is closed."""


def recipient_status(handler: InboundHandler) -> RecipientStatus:
    """The listener's RCPT decision for one address, as a status: the same checks, in the same
    order, as :meth:`InboundHandler.handle_RCPT` (minus the per-session recipient count, which
    Postfix enforces itself with smtpd_recipient_limit)."""

    async def status(address: str) -> str:
        recipient, answer = await handler.recipients.check(address)
        if recipient is None:
            return answer
        if await handler.mailbox_full(recipient.user_id):
            return MAILBOX_FULL
        if not handler.per_recipient.allowed(recipient.user_id):
            wait = handler.per_recipient.retry_after(recipient.user_id)
            return f"451 4.7.1 Too much mail for this mailbox; try again in {wait} seconds"
        return answer

    return status


def action_for(status: str) -> str:
    """The policy answer for a status: DUNNO lets Postfix's remaining restrictions decide."""
    if status.startswith("2"):
        return "DUNNO"
    # Our statuses are one line; make sure no CR/LF could end the answer early.
    return " ".join(status.split())


class PolicyServer:
    """The asyncio server and its open connections (Postfix keeps them open between mails, so
    closing must close them too, or ``wait_closed`` would wait for Postfix's idle timeout)."""

    def __init__(
        self,
        check: RecipientStatus,
        *,
        domain: str = "",
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
        request_timeout: float = REQUEST_TIMEOUT,
        check_timeout: float = CHECK_TIMEOUT,
    ) -> None:
        self.check = check
        # Recipients in other domains are not ours to judge: Postfix's own rules decide them.
        self.domain = domain.lower()
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.request_timeout = request_timeout
        self.check_timeout = check_timeout
        self.server: asyncio.AbstractServer | None = None
        self.connections: set[asyncio.StreamWriter] = set()
        self._warned_state = False

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> PolicyServer:
        """Listen on host:port (port 0: any free port, see ``.port``)."""
        # limit: a line longer than MAX_LINE makes readline() raise instead of buffering it.
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_LINE + 2)
        log.info("Answering Postfix policy requests on %s:%d", host, self.port)
        return self

    def close(self) -> None:
        """Stop listening and close every connection; a server never started is left alone."""
        if self.server is not None:
            self.server.close()
        for writer in list(self.connections):
            writer.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()

    async def stop(self) -> None:
        self.close()
        await self.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= self.max_connections:
            log.warning("Refused a policy connection: %d open", len(self.connections))
            writer.close()
            return
        self.connections.add(writer)
        try:
            while (request := await self._read_request(reader)) is not None:
                writer.write(f"action={await self.answer(request)}\n\n".encode())
                await writer.drain()
        except ProtocolError as e:
            log.warning("Closed a policy connection: %s", e)
        except (ConnectionError, TimeoutError):
            pass  # Postfix went away, or sat idle past our timeout: it reconnects when needed
        finally:
            self.connections.discard(writer)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader) -> dict[str, str] | None:
        """The next request's attributes; None when the client closed between requests."""
        async with asyncio.timeout(self.idle_timeout):
            first = await _read_line(reader)
        if first is None:
            return None
        attributes: dict[str, str] = {}
        async with asyncio.timeout(self.request_timeout):
            line: str | None = first
            while line:
                if len(attributes) >= MAX_ATTRIBUTES:
                    raise ProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
                name, eq, value = line.partition("=")
                if not eq or not name:
                    raise ProtocolError("a line that is not name=value")
                attributes[name] = value
                line = await _read_line(reader)
            if line is None:
                raise ProtocolError("connection closed inside a request")
        return attributes

    async def answer(self, request: dict[str, str]) -> str:
        """The action for one request."""
        recipient = request.get("recipient", "")
        if request.get("request") != "smtpd_access_policy" or not recipient:
            self._warn_misplaced(request)
            return "DUNNO"
        if self.domain and recipient.rpartition("@")[2].lower() != self.domain:
            return "DUNNO"
        try:
            async with asyncio.timeout(self.check_timeout):
                status = await self.check(recipient)
        except TimeoutError:
            log.warning("Recipient check for %s took over %.0f s", recipient, self.check_timeout)
            status = CHECK_TOO_SLOW
        except Exception:
            log.exception("Recipient check failed for %s", recipient)
            status = CHECK_FAILED
        if not status.startswith("2"):
            log.info("Policy: refused RCPT %s from %s: %s", recipient,
                     request.get("sender", ""), status)
        return action_for(status)

    def _warn_misplaced(self, request: dict[str, str]) -> None:
        # Wired into smtpd_sender_restrictions (or the like) this server would check nothing.
        if not self._warned_state:
            self._warned_state = True
            log.warning(
                "Policy request without a recipient (state %s): use check_policy_service in "
                "smtpd_recipient_restrictions", request.get("protocol_state", "?"),
            )


async def _read_line(reader: asyncio.StreamReader) -> str | None:
    """One line without its end; None at a clean end of stream."""
    try:
        raw = await reader.readline()
    except ValueError:  # asyncio's LimitOverrunError, after discarding the buffer
        raise ProtocolError(f"a line longer than {MAX_LINE} bytes") from None
    if not raw:
        return None
    if not raw.endswith(b"\n"):
        raise ProtocolError("connection closed inside a line")
    try:
        return raw.rstrip(b"\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("a line that is not UTF-8") from None


async def start_policy_server(
    check: RecipientStatus, host: str, port: int, *, domain: str = ""
) -> PolicyServer:
    """Serve Postfix's policy requests on host:port (port 0: any free port, see ``.port``)."""
    return await PolicyServer(check, domain=domain).start(host, port)
