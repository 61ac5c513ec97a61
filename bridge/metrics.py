"""Prometheus metrics and a health check, on an opt-in listener of their own (``metrics.listen``).

``/metrics`` serves the counters below plus figures read at scrape time (the queue from the
database, the loaded ghost identities from the app); ``/health`` answers 200 when the homeserver
and the database both answer, 503 naming what did not. Every wait is bounded, so a hung database
makes a scrape slow by at most ``metrics.timeout``, never stuck.

The counters live in :data:`REGISTRY`, a registry of our own rather than prometheus_client's
global one: nothing a library registers globally (or the process/platform collectors) leaks into
our output, and tests can read it without touching global state. The counters are per process
(``python -m bridge`` runs one bridge per process); what belongs to one bridge — its database,
its identities — is passed to :func:`start_metrics_server` as collectors and goes into a
registry made for that server, so two servers in one process never clash.

Nothing here carries an address, a user ID or a subject: labels are SMTP status codes and fixed
outcome words, so the series stay few and the figures say nothing about who mails whom.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from mautrix.util.async_db import Database
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger("bridge.metrics")

# A scrape or health check waits at most this long for the database or the homeserver.
DEFAULT_TIMEOUT = 2.0

REGISTRY = CollectorRegistry(auto_describe=True)

MAIL_ACCEPTED = Counter(
    "cloakroom_mail_accepted", "Messages committed to the inbound queue (answered 250).",
    registry=REGISTRY,
)
MAIL_REFUSED = Counter(
    "cloakroom_mail_refused",
    "SMTP/LMTP refusals, by the command that was refused (connect, mail, rcpt, data), the "
    "reply code and the enhanced status code (empty when the reply has none).",
    ["stage", "status", "code"], registry=REGISTRY,
)
DELIVERIES = Counter(
    "cloakroom_deliveries",
    "Inbound delivery attempts by outcome: delivered, retried, failed (given up), held (the "
    "reader has no device yet).",
    ["outcome"], registry=REGISTRY,
)
# Held mail may wait days for its reader's first device: the buckets reach a week.
DELIVERY_LATENCY = Histogram(
    "cloakroom_delivery_latency_seconds",
    "From a mail's receipt (its 250) to its delivery into the Matrix room.",
    buckets=(0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400),
    registry=REGISTRY,
)
MAIL_HOLDS = Counter(
    "cloakroom_mail_holds", "Deliveries put on hold until their reader has a device.",
    registry=REGISTRY,
)
MAIL_RELEASES = Counter(
    "cloakroom_mail_releases", "Held deliveries released because a device appeared.",
    registry=REGISTRY,
)
OUTBOUND = Counter(
    "cloakroom_outbound",
    "Outgoing mail by outcome: sent, deferred (a temporary problem, retried), bounced (refused "
    "by the relay), expired (given up after email.outbound.lifetime_hours).",
    ["outcome"], registry=REGISTRY,
)
DECRYPTION_FAILURES = Counter(
    "cloakroom_decryption_failures",
    "Matrix events the bridge gave up decrypting (and told the sender so), by reason: no_key "
    "(the room key never came), error (it came but did not decrypt).",
    ["reason"], registry=REGISTRY,
)
TRANSACTIONS = Counter(
    "cloakroom_appservice_transactions",
    "Appservice transactions from the homeserver by outcome: ok, replayed (already handled), "
    "retry (answered 500 so the homeserver resends), refused (bad token or body), error.",
    ["outcome"], registry=REGISTRY,
)
TRANSACTION_LATENCY = Histogram(
    "cloakroom_appservice_transaction_seconds",
    "How long the homeserver waited for the answer to a transaction.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)

# "550 5.1.1 …", "452-4.5.3 …", "250 2.0.0 …"; the enhanced code is optional (RFC 3463).
_REPLY = re.compile(r"^([245]\d\d)[ -]?(?:([245]\.\d{1,3}\.\d{1,3})\b)?")


def count_refusal(stage: str, reply: str) -> None:
    """Count ``reply`` as a refusal at ``stage`` if it is one (4xx or 5xx)."""
    match = _REPLY.match(reply or "")
    if match and match.group(1)[0] in "45":
        MAIL_REFUSED.labels(stage, match.group(1), match.group(2) or "").inc()


Hook = TypeVar("Hook", bound=Callable[..., Awaitable[str]])


def smtp_replies(stage: str) -> Callable[[Hook], Hook]:
    """Decorate an aiosmtpd ``handle_*`` hook: its refusals are counted at ``stage``. LMTP's
    one-line-per-recipient DATA answer counts once per message (its first line)."""

    def decorate(hook: Hook) -> Hook:
        @functools.wraps(hook)
        async def counted(*args: Any, **kwargs: Any) -> str:
            reply = await hook(*args, **kwargs)
            count_refusal(stage, reply.partition("\r\n")[0] if isinstance(reply, str) else "")
            return reply

        return counted  # type: ignore[return-value]

    return decorate


def delivered(received_at_ms: int) -> None:
    """A mail reached its room: one delivery, and its latency from receipt."""
    DELIVERIES.labels("delivered").inc()
    DELIVERY_LATENCY.observe(max(0.0, time.time() - received_at_ms / 1000))


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[web.StreamResponse]])


def observe_transaction(handler: Handler) -> Handler:
    """Decorate the appservice's transaction handler: count it by outcome and time it."""

    @functools.wraps(handler)
    async def observed(*args: Any, **kwargs: Any) -> web.StreamResponse:
        started = time.monotonic()
        outcome = "error"
        try:
            response = await handler(*args, **kwargs)
            outcome = "ok" if response.status < 300 else "error"
            return response
        except web.HTTPException as e:
            # A replay is acknowledged by raising 200 (see BridgeAppService): not new work.
            # 500: an event could not be recorded (MustRetry); 4xx: a bad token or body.
            outcome = {200: "replayed", 500: "retry"}.get(e.status, "refused")
            raise
        finally:
            TRANSACTIONS.labels(outcome).inc()
            TRANSACTION_LATENCY.observe(time.monotonic() - started)

    return observed  # type: ignore[return-value]


class FunctionGauge(Collector):
    """A gauge whose value the app supplies at scrape time (e.g. ``Identities.loaded_count``)."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self.name = name
        self.documentation = documentation
        self.value = value

    def collect(self) -> Iterator[Metric]:
        try:
            value = float(self.value())
        except Exception:
            log.exception("Could not read %s", self.name)
            return
        yield GaugeMetricFamily(self.name, self.documentation, value=value)


def ghost_identities_gauge(loaded_count: Callable[[], int]) -> FunctionGauge:
    return FunctionGauge(
        "cloakroom_ghost_identities_loaded",
        "Ghost crypto identities (device, Olm account) currently loaded in memory.",
        loaded_count,
    )


@dataclass
class _QueueFigures:
    pending: int = 0
    oldest_pending_ms: int | None = None
    held: int = 0
    held_mailboxes: int = 0
    outbox: int = 0
    oldest_outbox_ms: int | None = None


class QueueCollector(Collector):
    """Inbound queue, held mail and outbox, read from the database at scrape time.

    A query that fails or takes longer than ``timeout`` leaves these series out of that scrape
    (absent, not stale) and sets ``cloakroom_collector_up{collector="queue"}`` to 0."""

    def __init__(self, db: Database, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.db = db
        self.timeout = timeout
        self._figures: _QueueFigures | None = None
        self._read_at = 0.0

    async def refresh(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                self._figures = await self._read()
        except Exception as e:
            log.warning("Queue figures unavailable: %s", _describe(e, self.timeout))
            self._figures = None
        self._read_at = time.time()

    async def _read(self) -> _QueueFigures:
        figures = _QueueFigures()
        row = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, MIN(m.received_at) AS oldest FROM inbound_delivery d "
            "JOIN inbound_message m ON m.id = d.message_id WHERE d.state = 'pending'"
        )
        figures.pending, figures.oldest_pending_ms = int(row["n"]), row["oldest"]
        row = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT user_id) AS users FROM inbound_delivery "
            "WHERE state = 'held'"
        )
        figures.held, figures.held_mailboxes = int(row["n"]), int(row["users"])
        row = await self.db.fetchrow(
            "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM outbox "
            "WHERE state IN ('pending', 'sending')"
        )
        figures.outbox, figures.oldest_outbox_ms = int(row["n"]), row["oldest"]
        return figures

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "cloakroom_collector_up", "Whether a scrape-time collector could read its figures.",
            labels=["collector"],
        )
        up.add_metric(["queue"], 0 if self._figures is None else 1)
        yield up
        f = self._figures
        if f is None:
            return
        yield _gauge("cloakroom_inbound_queue_depth",
                     "Inbound deliveries waiting to be posted (not held).", f.pending)
        yield _gauge("cloakroom_inbound_queue_oldest_age_seconds",
                     "Age of the oldest inbound delivery waiting to be posted; 0 when none.",
                     self._age(f.oldest_pending_ms))
        yield _gauge("cloakroom_mail_held",
                     "Inbound deliveries held until their reader has a device.", f.held)
        yield _gauge("cloakroom_mail_held_mailboxes",
                     "Mailboxes with mail held until their owner has a device.", f.held_mailboxes)
        yield _gauge("cloakroom_outbox_depth", "Outgoing mails waiting to be sent.", f.outbox)
        yield _gauge("cloakroom_outbox_oldest_age_seconds",
                     "Age of the oldest outgoing mail waiting to be sent; 0 when none.",
                     self._age(f.oldest_outbox_ms))

    def _age(self, oldest_ms: int | None) -> float:
        return 0.0 if oldest_ms is None else max(0.0, self._read_at - int(oldest_ms) / 1000)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class _Shared(Collector):
    """The process-wide counters, inside a server's own registry."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


# Health checks: each a coroutine that returns when the service answers and raises otherwise.
Check = Callable[[], Awaitable[object]]
Health = Callable[[], Awaitable[dict[str, str]]]


def _describe(error: BaseException, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within {timeout:g} s"
    text = str(error) or type(error).__name__
    return text if len(text) <= 200 else text[:199] + "…"


async def run_checks(checks: Mapping[str, Check], timeout: float) -> dict[str, str]:
    """Every check at once, each bounded by ``timeout``: name → "ok" or what went wrong."""

    async def one(check: Check) -> str:
        try:
            async with asyncio.timeout(timeout):
                await check()
            return "ok"
        except Exception as e:
            return _describe(e, timeout)

    results = await asyncio.gather(*(one(check) for check in checks.values()))
    return dict(zip(checks, results, strict=True))


def homeserver_check(address: str, session: aiohttp.ClientSession | None = None) -> Check:
    """``GET /_matrix/client/versions`` answers 200. A session of its own by default, so a
    busy appservice connection pool is not mistaken for a homeserver that is down."""
    url = address.rstrip("/") + "/_matrix/client/versions"

    async def check() -> None:
        async def get(client: aiohttp.ClientSession) -> None:
            async with client.get(url) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"GET /_matrix/client/versions answered {resp.status}")
                await resp.read()

        if session is not None:
            await get(session)
            return
        async with aiohttp.ClientSession() as own:
            await get(own)

    return check


def database_check(db: Database) -> Check:
    async def check() -> None:
        await db.fetchval("SELECT 1")

    return check


def bridge_health(
    *, homeserver: str, db: Database, timeout: float = DEFAULT_TIMEOUT,
    session: aiohttp.ClientSession | None = None,
) -> Health:
    """The ``health`` callable for :func:`start_metrics_server`: homeserver and database."""
    checks = {"homeserver": homeserver_check(homeserver, session), "database": database_check(db)}
    return functools.partial(run_checks, checks, timeout)


@dataclass
class MetricsServer:
    """The running listener; ``await stop()`` closes it."""

    runner: web.AppRunner
    host: str
    port: int
    registry: CollectorRegistry = field(repr=False)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_metrics_server(
    host: str,
    port: int,
    health: Health,
    collectors: Iterable[Collector] = (),
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> MetricsServer:
    """Serve ``/metrics`` and ``/health`` on host:port (port 0 here picks a free port; the
    config's "0 = off" is the caller's to honour)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Shared())
    collectors = list(collectors)
    for collector in collectors:
        registry.register(collector)
    # collect() is synchronous and must not block the event loop: collectors that read the
    # database have an async refresh(), awaited (each bounded by its own timeout) per scrape.
    refreshing = [c for c in collectors if callable(getattr(c, "refresh", None))]

    async def metrics(request: web.Request) -> web.Response:
        await asyncio.gather(*(c.refresh() for c in refreshing))  # type: ignore[attr-defined]
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return await _health_response(health, timeout)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0][1] if runner.addresses else port
    log.info("Metrics on http://%s:%d/metrics, health on /health", host, bound)
    return MetricsServer(runner, host, bound, registry)


async def _health_response(health: Health, timeout: float) -> web.Response:
    try:
        # The checks bound themselves; this bounds a health callable that does not.
        async with asyncio.timeout(timeout + 1):
            checks = await health()
    except Exception as e:
        checks = {"health": _describe(e, timeout + 1)}
    failed = sorted(name for name, result in checks.items() if result != "ok")
    if failed:
        body = {"status": "unavailable", "failed": failed, "checks": checks}
        return web.json_response(body, status=503, dumps=json.dumps)
    return web.json_response({"status": "ok", "checks": checks})
