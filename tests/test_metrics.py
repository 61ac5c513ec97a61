"""Metrics and health: the listener, the scrape-time queue figures, the bounded health checks,
and the real bridge's numbers moving when real mail comes in."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from mautrix.util.async_db import Database
from prometheus_client.parser import text_string_to_metric_families

from bridge.db import open_database
from bridge.email.queue import InboundQueue, QueuedRecipient
from bridge.metrics import (
    MAIL_REFUSED,
    REGISTRY,
    TRANSACTIONS,
    MetricsServer,
    QueueCollector,
    bridge_health,
    count_refusal,
    ghost_identities_gauge,
    observe_transaction,
    smtp_replies,
    start_metrics_server,
)

from .harness import Env
from .mail import make_mail, send, smtp_dialogue, unique


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text → {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.get(url) as resp:
            return resp.status, await resp.text()


@contextlib.asynccontextmanager
async def serving(
    health: Callable[[], Awaitable[dict[str, str]]], collectors: Sequence[Any] = (),
    timeout: float = 0.5,
) -> AsyncIterator[MetricsServer]:
    server = await start_metrics_server("127.0.0.1", 0, health, collectors, timeout=timeout)
    try:
        yield server
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def fake_homeserver(answer: bool = True) -> AsyncIterator[str]:
    """A homeserver that answers /versions, or (answer=False) takes requests and never answers."""
    never = asyncio.Event()

    async def versions(request: web.Request) -> web.Response:
        if not answer:
            await never.wait()
        return web.json_response({"versions": ["v1.11"]})

    app = web.Application()
    app.router.add_get("/_matrix/client/versions", versions)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        never.set()
        await runner.cleanup()


def closed_port_url() -> str:
    from bridge.quickstart.synapse import free_port

    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
async def sqlite_db(tmp_path) -> AsyncIterator[Database]:
    db = await open_database(f"sqlite:{tmp_path / 'bridge.db'}")
    try:
        yield db
    finally:
        await db.stop()


class HangingDb:
    """A database whose queries never come back."""

    async def fetchval(self, *args: Any) -> Any:
        await asyncio.Event().wait()

    fetchrow = fetchval


# Refusals, SMTP hooks, transactions.

def test_refusals_are_counted_by_reply_and_enhanced_code() -> None:
    before = MAIL_REFUSED.labels("rcpt", "550", "5.1.1")._value.get()
    count_refusal("rcpt", "550 5.1.1 No such user here")
    count_refusal("rcpt", "250 2.1.5 OK")  # not a refusal
    assert MAIL_REFUSED.labels("rcpt", "550", "5.1.1")._value.get() == before + 1
    before = MAIL_REFUSED.labels("connect", "421", "4.7.0")._value.get()
    count_refusal("connect", "421 4.7.0 Too many connections; try again later")
    assert MAIL_REFUSED.labels("connect", "421", "4.7.0")._value.get() == before + 1
    before = MAIL_REFUSED.labels("data", "500", "")._value.get()
    count_refusal("data", "500 Line too long")  # no enhanced code: an empty label
    assert MAIL_REFUSED.labels("data", "500", "")._value.get() == before + 1


async def test_an_smtp_hook_counts_its_refusals_once_per_message() -> None:
    @smtp_replies("data")
    async def hook(*args: Any) -> str:
        return "\r\n".join(["451 4.3.0 Temporary failure"] * 3)  # LMTP, three recipients

    before = MAIL_REFUSED.labels("data", "451", "4.3.0")._value.get()
    assert (await hook()).count("451") == 3
    assert MAIL_REFUSED.labels("data", "451", "4.3.0")._value.get() == before + 1


async def test_transactions_are_counted_by_outcome_and_timed() -> None:
    @observe_transaction
    async def handler(kind: str) -> web.Response:
        if kind == "replay":
            raise web.HTTPOk(text="{}")
        if kind == "retry":
            raise web.HTTPInternalServerError()
        if kind == "refused":
            raise web.HTTPForbidden()
        return web.json_response({})

    before = {o: TRANSACTIONS.labels(o)._value.get() for o in ("ok", "replayed", "retry",
                                                                "refused")}
    await handler("ok")
    for kind, exc in (("replay", web.HTTPOk), ("retry", web.HTTPInternalServerError),
                      ("refused", web.HTTPForbidden)):
        with pytest.raises(exc):
            await handler(kind)
    after = {o: TRANSACTIONS.labels(o)._value.get() for o in before}
    assert {o: after[o] - before[o] for o in before} == {
        "ok": 1, "replayed": 1, "retry": 1, "refused": 1
    }


# The listener.

async def test_metrics_serves_counters_queue_figures_and_the_identities_gauge(
    sqlite_db: Database,
) -> None:
    queue = InboundQueue(sqlite_db, "pickle")
    await queue.enqueue(raw=b"Subject: a\r\n\r\nx", mail_from="bob@example.org", peer="::1",
                        helo="h", auth=None, order_key="a",
                        recipients=[QueuedRecipient("@a:localhost", "a@localhost", "")])
    await queue.enqueue(raw=b"Subject: b\r\n\r\ny", mail_from="bob@example.org", peer="::1",
                        helo="h", auth=None, order_key="b",
                        recipients=[QueuedRecipient("@b:localhost", "b@localhost", "")])
    await queue.hold_user("@b:localhost")
    await asyncio.sleep(0.05)  # an age to measure, not a synchronisation
    health = bridge_health(homeserver=closed_port_url(), db=sqlite_db, timeout=0.5)
    collectors = [QueueCollector(sqlite_db, 0.5), ghost_identities_gauge(lambda: 7)]
    async with serving(health, collectors) as server:
        status, text = await get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    assert value(text, "cloakroom_inbound_queue_depth") == 1
    assert value(text, "cloakroom_mail_held") == 1
    assert value(text, "cloakroom_mail_held_mailboxes") == 1
    assert 0 < value(text, "cloakroom_inbound_queue_oldest_age_seconds") < 60
    assert value(text, "cloakroom_outbox_depth") == 0
    assert value(text, "cloakroom_ghost_identities_loaded") == 7
    assert value(text, "cloakroom_collector_up", collector="queue") == 1
    # The process-wide counters are there too, with every label set that was used.
    assert "cloakroom_mail_accepted_total" in text
    assert "cloakroom_delivery_latency_seconds_bucket" in text


async def test_a_hung_database_leaves_the_queue_figures_out_and_the_scrape_bounded() -> None:
    async with serving(bridge_health(homeserver=closed_port_url(), db=HangingDb()),
                       [QueueCollector(HangingDb(), 0.3)]) as server:
        started = time.monotonic()
        status, text = await get(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200 and time.monotonic() - started < 5
    assert value(text, "cloakroom_collector_up", collector="queue") == 0
    assert "cloakroom_inbound_queue_depth" not in text
    assert "cloakroom_mail_accepted_total" in text


async def test_two_servers_in_one_process_keep_their_own_collectors(sqlite_db: Database) -> None:
    async def ok() -> dict[str, str]:
        return {"homeserver": "ok", "database": "ok"}

    async with serving(ok, [ghost_identities_gauge(lambda: 1)]) as one, \
            serving(ok, [ghost_identities_gauge(lambda: 2)]) as two:
        _, first = await get(f"http://127.0.0.1:{one.port}/metrics")
        _, second = await get(f"http://127.0.0.1:{two.port}/metrics")
    assert value(first, "cloakroom_ghost_identities_loaded") == 1
    assert value(second, "cloakroom_ghost_identities_loaded") == 2


async def test_health_is_200_when_homeserver_and_database_answer(sqlite_db: Database) -> None:
    async with fake_homeserver() as hs, serving(bridge_health(homeserver=hs, db=sqlite_db)) as s:
        status, text = await get(f"http://127.0.0.1:{s.port}/health")
    assert status == 200, text
    assert json.loads(text) == {"status": "ok", "checks": {"homeserver": "ok", "database": "ok"}}


async def test_health_is_503_naming_an_unreachable_homeserver(sqlite_db: Database) -> None:
    health = bridge_health(homeserver=closed_port_url(), db=sqlite_db, timeout=0.5)
    async with serving(health) as server:
        status, text = await get(f"http://127.0.0.1:{server.port}/health")
    body = json.loads(text)
    assert status == 503, text
    assert body["failed"] == ["homeserver"] and body["checks"]["database"] == "ok"


async def test_health_is_503_when_the_homeserver_never_answers_and_says_so_in_time(
    sqlite_db: Database,
) -> None:
    async with fake_homeserver(answer=False) as hs:
        async with serving(bridge_health(homeserver=hs, db=sqlite_db, timeout=0.5)) as server:
            started = time.monotonic()
            status, text = await get(f"http://127.0.0.1:{server.port}/health")
            took = time.monotonic() - started
    body = json.loads(text)
    assert status == 503 and body["failed"] == ["homeserver"], text
    assert body["checks"]["homeserver"] == "no answer within 0.5 s"
    assert took < 5


async def test_health_is_503_naming_an_unreachable_database(tmp_path) -> None:
    db = await open_database(f"sqlite:{tmp_path / 'gone.db'}")
    await db.stop()  # the database is closed: queries fail
    async with fake_homeserver() as hs:
        async with serving(bridge_health(homeserver=hs, db=db, timeout=0.5)) as server:
            status, text = await get(f"http://127.0.0.1:{server.port}/health")
    body = json.loads(text)
    assert status == 503, text
    assert body["failed"] == ["database"] and body["checks"]["homeserver"] == "ok"


async def test_health_is_503_naming_a_database_that_never_answers() -> None:
    async with fake_homeserver() as hs:
        async with serving(bridge_health(homeserver=hs, db=HangingDb(), timeout=0.3)) as server:
            status, text = await get(f"http://127.0.0.1:{server.port}/health")
    body = json.loads(text)
    assert status == 503 and body["failed"] == ["database"], text
    assert body["checks"]["database"] == "no answer within 0.3 s"


def test_counters_are_not_in_the_global_registry() -> None:
    from prometheus_client import REGISTRY as GLOBAL

    assert GLOBAL.get_sample_value("cloakroom_mail_accepted_total") is None
    assert REGISTRY.get_sample_value("cloakroom_mail_accepted_total") is not None


# The real bridge, with real mail.

async def scrape(env: Env) -> str:
    status, text = await get(f"http://127.0.0.1:{env.metrics_port}/metrics")
    assert status == 200, text
    return text


async def until(env: Env, moved: Callable[[str], bool], timeout: float = 60) -> str:
    """Scrape until `moved` holds (the delivery happens after the 250), or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        text = await scrape(env)
        if moved(text) or time.monotonic() > deadline:
            return text
        await asyncio.sleep(0.5)


async def test_the_real_bridge_counts_real_mail_and_is_healthy(running: Env) -> None:
    assert running.metrics_port, "tests/stack.py gives the main bridge a metrics port"
    before = await scrape(running)
    alice = await running.new_user()
    local = alice.user_id[1:].split(":")[0]
    code, text = await asyncio.to_thread(
        smtp_dialogue, running.smtp_port, f"<nobody-{unique()}@localhost>"
    )
    assert code == 550 and text.startswith("5.1.1"), text
    await send(running.smtp_port, make_mail(to=f"{local}@localhost", text=unique("metrics")),
               [f"{local}@localhost"])

    def latency_count(text: str) -> float:
        return value(text, "cloakroom_delivery_latency_seconds_count")

    after = await until(running, lambda t: latency_count(t) >= latency_count(before) + 1)
    assert value(after, "cloakroom_mail_accepted_total") == value(
        before, "cloakroom_mail_accepted_total") + 1
    assert latency_count(after) >= latency_count(before) + 1
    refused = {"stage": "rcpt", "status": "550", "code": "5.1.1"}
    assert value(after, "cloakroom_mail_refused_total", **refused) >= value(
        before, "cloakroom_mail_refused_total", **refused) + 1
    assert value(after, "cloakroom_appservice_transactions_total", outcome="ok") > 0
    assert value(after, "cloakroom_ghost_identities_loaded") >= 1
    assert value(after, "cloakroom_collector_up", collector="queue") == 1
    status, body = await get(f"http://127.0.0.1:{running.metrics_port}/health")
    assert status == 200, body
    assert json.loads(body)["checks"] == {"homeserver": "ok", "database": "ok"}
