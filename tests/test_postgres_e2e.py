"""The integration tests again with the bridge's database on PostgreSQL (the `pg` bridge).

Mail in, mail out, the ghosts' cross-signed devices, held mail and restarts: the paths whose SQL
differs most between the two databases (BYTEA vs BLOB, BIGSERIAL, RETURNING, advisory work). The
pg bridge acts only for tests.stack.PG_USERS; each test takes its own users from that list.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from nio import RoomMessageText

from .harness import Env, accept_invite, wait_for_event
from .mail import make_mail, send, unique
from .test_email_out import _containing, _portal, _relay_wait, _say
from .test_every_device import assert_reads, local, mail, texts
from .test_ghost_identity import _check_signed_by_own_identity, _encrypted_events, _keys

pytestmark = pytest.mark.postgres


def _ghost(address: str) -> str:
    return "@_email5_" + address.replace("@", "=40") + ":localhost"


async def _query(env: Env, sql: str, *args: Any) -> list[asyncpg.Record]:
    """Read the pg bridge's database while it runs (its own connection, closed at once)."""
    conn = await asyncpg.connect(env.config["database"])
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    """Poll a condition on the database: the bridge's work is asynchronous to the test's."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.2)


async def _held(env: Env, user_id: str) -> int:
    rows = await _query(env, "SELECT COUNT(*) AS n FROM inbound_delivery "
                             "WHERE user_id=$1 AND state='held'", user_id)
    return rows[0]["n"]


async def test_the_pg_bridge_really_runs_on_postgres(pg: Env) -> None:
    assert pg.config["database"].startswith("postgres://")
    rows = await _query(pg, "SELECT version FROM cloakroom_version")
    assert rows and rows[0]["version"] >= 10
    rows = await _query(pg, "SELECT COUNT(*) AS n FROM crypto_account")
    assert rows[0]["n"] >= 1, "the bot's Olm account is not in PostgreSQL"


async def test_mail_in_arrives_decrypted(pg: Env) -> None:
    alice = await pg.new_user("pg1")
    to, token = f"{local(alice.user_id)}@localhost", unique("pgin")
    await send(pg.smtp_port, make_mail(to=to, subject="Lunch?", text=f"Free? {token}"), [to])
    room_id = await accept_invite(alice)
    assert alice.rooms[room_id].encrypted, "the portal room is not encrypted"
    msg = await wait_for_event(alice, room_id, lambda e: isinstance(e, RoomMessageText))
    assert msg.decrypted, "the mail was posted unencrypted"
    assert msg.sender == _ghost("bob@example.org")
    assert token in msg.body and "Lunch?" in msg.body
    # The portal and the Message-ID map live in PostgreSQL; the raw mail is gone after delivery.
    portals = await _query(pg, "SELECT room_id FROM portal WHERE owner=$1", alice.user_id)
    assert [r["room_id"] for r in portals] == [room_id]
    assert not await _query(pg, "SELECT 1 FROM inbound_delivery WHERE user_id=$1", alice.user_id)


async def test_a_reply_from_matrix_is_mailed(pg: Env) -> None:
    alice = await pg.new_user("pg2")
    room_id, root, bob_mid = await _portal(pg, alice)
    token = unique("pgout")
    await _say(alice, room_id, f"Sounds good {token}", thread=root.event_id)
    (sent,) = await _relay_wait(pg, _containing(token))
    assert sent.rcpt_tos == ["bob@example.org"]
    assert sent.message["In-Reply-To"] == f"<{bob_mid}>"
    assert sent.message["Subject"] == "Re: Plans"


async def test_the_ghost_sends_from_its_own_cross_signed_device(pg: Env) -> None:
    alice = await pg.new_user("pg3")
    to, sender = f"{local(alice.user_id)}@localhost", f"{unique('vera')}@example.org"
    await send(pg.smtp_port, make_mail(to=to, sender=f"Vera <{sender}>", text="first"), [to],
               mail_from=sender)
    room_id = await accept_invite(alice)
    await wait_for_event(alice, room_id, lambda e: "first" in getattr(e, "body", ""))
    ghost = _ghost(sender)
    (event,) = [e for e in await _encrypted_events(pg, alice.access_token, room_id)
                if e["sender"] == ghost]
    keys = await _keys(pg, alice.access_token, ghost)
    _check_signed_by_own_identity(keys, ghost, event["content"]["device_id"],
                                  event["content"]["sender_key"])
    # Its identity is stored in PostgreSQL, sealed, beside the bot's.
    rows = await _query(pg, "SELECT 1 FROM crypto_account WHERE account_id=$1", ghost)
    assert rows, "the ghost's Olm account is not in the pg bridge's database"


async def test_mail_is_held_until_the_first_login_then_read(pg: Env) -> None:
    user_id, _ = await pg.register("pg4")
    token = unique("pghold")
    await mail(pg, f"{local(user_id)}@localhost", token)
    await _until(lambda: _is(_held(pg, user_id), 1), "the mail being held")
    phone = await pg.login(user_id, "first phone")
    room_id = await accept_invite(phone)
    assert_reads(await texts(phone, room_id, 1), token)
    assert await _held(pg, user_id) == 0


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def test_sigterm_and_sigkill_lose_no_inbound_mail(pg: Env) -> None:
    user_id, _ = await pg.register("pg5")
    to, first, second = f"{local(user_id)}@localhost", unique("term"), unique("kill")
    await mail(pg, to, first)
    await _until(lambda: _is(_held(pg, user_id), 1), "the first mail being held")
    assert pg.bridge.stop(signal.SIGTERM) == 0
    await asyncio.to_thread(pg.bridge.start)
    await mail(pg, to, second)
    await _until(lambda: _is(_held(pg, user_id), 2), "the second mail being held")
    assert pg.bridge.stop(signal.SIGKILL) == -signal.SIGKILL
    await asyncio.to_thread(pg.bridge.start)
    phone = await pg.login(user_id, "after the crash")
    room_id = await accept_invite(phone)
    events = await texts(phone, room_id, 2)
    assert_reads(events, first, second)
    assert [first in e.body for e in events] == [True, False], "out of order"


async def test_sigkill_with_a_full_outbox_mails_exactly_once(pg: Env) -> None:
    alice = await pg.new_user("pg6")
    correspondent = f"{unique('later')}@example.org"
    room_id, root, _ = await _portal(pg, alice, correspondent)
    pg.relay.script(correspondent, *["451 4.3.0 not now"] * 50)
    token = unique("pgoutbox")
    event_id = await _say(alice, room_id, token, thread=root.event_id)

    async def tried() -> bool:
        rows = await _query(pg, "SELECT attempts FROM outbox WHERE event_id=$1", event_id)
        return bool(rows) and rows[0]["attempts"] >= 1

    await _until(tried, "the reply being tried once")
    assert pg.bridge.stop(signal.SIGKILL) == -signal.SIGKILL
    pg.relay.scripts[correspondent].clear()
    await asyncio.to_thread(pg.bridge.start)
    await _relay_wait(pg, _containing(token))
    sentinel = unique("sentinel")
    await _say(alice, room_id, sentinel, thread=root.event_id)
    await _relay_wait(pg, _containing(sentinel))
    assert len(pg.relay.find(_containing(token))) == 1
