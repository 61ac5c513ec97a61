"""The outbound worker: the outbox → the relay (aiosmtplib), with retries and honest failures.

4xx answers and connection problems are retried with backoff until `email.outbound.lifetime_hours`;
a 5xx answer or an expired lifetime becomes a notice in the thread, replying to the message that
failed, with the server's own words. Success is silent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import aiosmtplib

from ..config import Config
from ..metrics import OUTBOUND
from ..portal import PortalManager
from ..portal.outbox import Outbox, OutboxRow
from ..worker import DueWorker, backoff_ms, now_ms
from .dkimsign import DkimKey, sign

MAX_BACKOFF_MS = 15 * 60 * 1000


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int
    security: str  # none | starttls | tls
    username: str
    # Out of the repr: settings end up in log lines and tracebacks, the password must not.
    password: str = field(repr=False)
    timeout: float


@dataclass
class Outcome:
    """What the relay said: temporary problems are retried, permanent ones are reported."""

    temporary: str | None = None
    permanent: list[str] | None = None


def _line(code: int, message: str, recipient: str = "") -> str:
    """``bob@example.org: 550 5.1.1 user unknown`` — the server's own words, on one line."""
    text = f"{code} {' '.join(str(message).split())}".strip()
    return f"{recipient}: {text}" if recipient else text


class OutboundWorker:
    def __init__(
        self,
        *,
        outbox: Outbox,
        hub: PortalManager,
        relay: RelaySettings,
        lifetime_ms: int,
        dkim: DkimKey | None,
    ) -> None:
        self.outbox = outbox
        self.hub = hub
        self.relay = relay
        self.lifetime_ms = lifetime_ms
        self.dkim = dkim
        self.log = logging.getLogger("bridge.email.out")
        self._loop = DueWorker(self._round, outbox.next_due_at, self.log)

    def wake(self) -> None:
        self._loop.wake()

    async def start(self) -> None:
        await self.outbox.recover()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()

    async def _round(self) -> bool:
        due = await self.outbox.due()
        for row in due:
            await self._process(row)
        return bool(due)

    async def _process(self, row: OutboxRow) -> None:
        if not await self.outbox.claim(row.event_id):
            return  # withdrawn by a redaction in the meantime
        outcome = await self._send(row)
        if outcome.permanent:
            await self.outbox.finish(row.event_id, "failed", "; ".join(outcome.permanent))
            OUTBOUND.labels("bounced").inc()
            await self._tell(row, "⚠ This message was not delivered:\n" + "\n".join(
                f"• {line}" for line in outcome.permanent))
        elif outcome.temporary is None:
            await self.outbox.finish(row.event_id, "sent")
            OUTBOUND.labels("sent").inc()
            self.log.info("Sent %s as <%s>", row.event_id, row.message_id)
        elif now_ms() - row.created_at > self.lifetime_ms:
            await self.outbox.finish(row.event_id, "failed", outcome.temporary)
            OUTBOUND.labels("expired").inc()
            hours = self.lifetime_ms // 3_600_000
            await self._tell(row, f"⚠ Gave up sending this message after {hours} h of trying. "
                                  f"The last answer was: {outcome.temporary}")
        else:
            delay = backoff_ms(row.attempts, MAX_BACKOFF_MS)
            self.log.warning("Relay problem for %s (attempt %d): %s; retrying in %d s",
                             row.event_id, row.attempts + 1, outcome.temporary, delay // 1000)
            await self.outbox.retry_later(row.event_id, delay, outcome.temporary)
            OUTBOUND.labels("deferred").inc()

    async def _tell(self, row: OutboxRow, text: str) -> None:
        try:
            await self.hub.notify(row.room_id, text, row.event_id, row.thread_root)
        except Exception:
            self.log.exception("Could not tell %s that %s failed", row.owner, row.event_id)

    async def _send(self, row: OutboxRow) -> Outcome:
        # dkimpy's RSA is pure Python (~10 ms a mail): keep it off the event loop.
        raw = await asyncio.to_thread(sign, row.raw, self.dkim) if self.dkim else row.raw
        relay = self.relay
        client = aiosmtplib.SMTP(
            hostname=relay.host,
            port=relay.port,
            use_tls=relay.security == "tls",
            start_tls=True if relay.security == "starttls" else False,
            username=relay.username or None,
            password=relay.password or None,
            timeout=relay.timeout,
        )
        try:
            async with client:
                refused, _ = await client.sendmail(row.mail_from, row.recipients, raw)
        except aiosmtplib.SMTPRecipientsRefused as e:
            return _classify([_line(r.code, r.message, r.recipient) for r in e.recipients],
                             [r.code for r in e.recipients])
        except aiosmtplib.SMTPResponseException as e:
            return _classify([_line(e.code, e.message)], [e.code])
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as e:
            return Outcome(temporary=f"could not talk to the relay: {e}")
        if refused:
            # Some recipients took it: the mail is sent; the others are reported, not retried.
            return Outcome(permanent=[_line(r.code, r.message, addr)
                                      for addr, r in refused.items()])
        return Outcome()


def _classify(lines: list[str], codes: list[int]) -> Outcome:
    if any(500 <= code < 600 for code in codes):
        return Outcome(permanent=lines)
    return Outcome(temporary="; ".join(lines))


def build_outbound(config: Config, outbox: Outbox, hub: PortalManager) -> OutboundWorker | None:
    """The worker as configured; None when no relay is set (sending is off)."""
    if not config["email.relay.host"]:
        return None
    dkim = None
    if config["email.dkim.private_key"]:
        dkim = DkimKey.load(
            config["email.dkim.private_key"], config["email.dkim.selector"], config.email_domain
        )
    return OutboundWorker(
        outbox=outbox,
        hub=hub,
        relay=RelaySettings(
            host=config["email.relay.host"],
            port=config["email.relay.port"],
            security=config["email.relay.security"],
            username=config["email.relay.username"],
            password=config["email.relay.password"],
            timeout=float(config["email.relay.timeout"]),
        ),
        lifetime_ms=int(config["email.outbound.lifetime_hours"] * 3_600_000),
        dkim=dkim,
    )
