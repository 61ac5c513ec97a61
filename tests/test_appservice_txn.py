"""The transaction endpoint without Synapse: size limit, per-event isolation, retry on loss."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from mautrix.appservice.state_store.asyncpg import PgASStateStore
from mautrix.types import Event
from mautrix.util.async_db import Database

from bridge.db import TxnLog
from bridge.matrix.appservice import BridgeAppService, MustRetry

HS_TOKEN = "hs-token"


def message(body: str, room: str = "!r:hs") -> dict[str, Any]:
    return {
        "type": "m.room.message", "room_id": room, "sender": "@alice:hs",
        "event_id": f"$e-{secrets.token_hex(6)}", "origin_server_ts": int(time.time() * 1000),
        "content": {"msgtype": "m.text", "body": body},
    }


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, evt: Event) -> None:
        body = getattr(evt.content, "body", "")
        if body == "boom":
            raise RuntimeError("a handler bug")
        if body == "cannot record":
            raise MustRetry("database down")
        self.seen.append(body)


@pytest.fixture
async def served(db: Database) -> AsyncIterator[tuple[TestClient, Recorder, TxnLog]]:
    az = BridgeAppService(
        server="http://127.0.0.1:9", domain="hs", as_token="as-token", hs_token=HS_TOKEN,
        bot_localpart="bot", id="test", state_store=PgASStateStore(db), txn_log=TxnLog(db),
        encryption_events=True, ephemeral_events=True,
    )
    recorder = Recorder()
    az.matrix_event_handler(recorder)
    az.started.set()
    client = TestClient(TestServer(az.app))
    await client.start_server()
    try:
        yield client, recorder, az.txn_log
    finally:
        await client.close()


async def put(client: TestClient, txn_id: str, body: dict[str, Any]) -> int:
    resp = await client.put(
        f"/_matrix/app/v1/transactions/{txn_id}", json=body,
        headers={"Authorization": f"Bearer {HS_TOKEN}"},
    )
    return resp.status


async def test_a_transaction_larger_than_1_mib_is_taken(served: Any) -> None:
    client, recorder, _ = served
    # 100 PDUs of ~20 KiB each: about 2 MiB, twice aiohttp's default limit.
    events = [message(f"{i} " + "x" * 20_000) for i in range(100)]
    assert await put(client, "big", {"events": events}) == 200
    assert len(recorder.seen) == 100


async def test_one_bad_event_never_drops_the_rest(
    served: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client, recorder, txn_log = served
    bad = message("boom")
    with caplog.at_level(logging.ERROR, "bridge.as.txn"):
        status = await put(client, "mixed", {"events": [message("one"), bad, message("two")]})
    assert status == 200
    assert recorder.seen == ["one", "two"]
    assert any(bad["event_id"] in r.getMessage() for r in caplog.records)
    assert await txn_log.seen("mixed")


async def test_an_event_that_could_not_be_recorded_fails_the_transaction(served: Any) -> None:
    client, recorder, txn_log = served
    body = {"events": [message("first"), message("cannot record")]}
    assert await put(client, "lossy", body) == 500
    assert not await txn_log.seen("lossy")
    # Synapse sends it again; this time the database is back.
    body["events"][1]["content"]["body"] = "recorded now"
    assert await put(client, "lossy", body) == 200
    assert recorder.seen == ["first", "first", "recorded now"]
    assert await txn_log.seen("lossy")
