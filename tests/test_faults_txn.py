"""Faults on the appservice endpoint (issue 10): the homeserver's retries and forgeries.

Synapse resends a transaction it got no answer to, and a crash can make it send the same events
again under a new transaction id; both must take effect once. Negative checks use ordering, not
sleeps: the bot answers a room's commands in order, and the outbox is keyed by event, so once the
sentinel sent last has had its effect, any effect of a replay would already be there.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import urllib.parse
import urllib.request
from typing import Any

from nio import AsyncClient

from .harness import (
    Env,
    open_dm_with_bot,
    put_transaction,
    room_history,
    send_text,
    wait_for_event,
)
from .test_email_out import _containing, _portal, _relay_wait, _say
from .test_every_device import query, until


def _event(room_id: str, sender: str, body: str) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "room_id": room_id,
        "sender": sender,
        "event_id": f"$fault-{secrets.token_hex(8)}",
        "origin_server_ts": int(time.time() * 1000),
        "content": {"msgtype": "m.text", "body": body},
    }


async def _put(env: Env, txn_id: str, events: list[dict[str, Any]],
               token: str | None = "hs") -> int:
    return await asyncio.to_thread(
        put_transaction, env, txn_id, {"events": events},
        env.hs_token if token == "hs" else token,
    )


async def _at_once(env: Env, txn_id: str, events: list[dict[str, Any]]) -> list[int]:
    """Two identical PUTs in flight together, as a homeserver retrying a slow request does."""
    return list(await asyncio.gather(_put(env, txn_id, events), _put(env, txn_id, events)))


def _bot_answers(events: list, bot: str, text: str) -> int:
    return sum(1 for e in events if e.sender == bot and text in getattr(e, "body", ""))


async def test_replayed_and_duplicated_transactions_answer_a_command_once(running: Env) -> None:
    alice = await running.new_user()
    bot = running.bot_mxid
    room_id = await open_dm_with_bot(alice, bot)
    started = time.monotonic()
    statuses: dict[str, object] = {}

    # Forged: no token, a wrong one. Each carries a `help` that must never be answered.
    statuses["no token"] = await _put(running, f"f-{secrets.token_hex(4)}",
                                      [_event(room_id, alice.user_id, "help")], None)
    statuses["wrong token"] = await _put(running, f"f-{secrets.token_hex(4)}",
                                         [_event(room_id, alice.user_id, "help")], "wrong")

    # The one `help` that counts, then: the same transaction again, and a new transaction id
    # carrying the same event (a homeserver that lost track of what it had sent).
    help_evt = _event(room_id, alice.user_id, "help")
    txn = f"t-{secrets.token_hex(4)}"
    statuses["first"] = await _put(running, txn, [help_evt])
    statuses["replay"] = await _put(running, txn, [help_evt])
    statuses["new txn id, same event"] = await _put(running, f"t-{secrets.token_hex(4)}",
                                                    [help_evt])
    # A `status` sent as two identical PUTs at once.
    statuses["two at once"] = await _at_once(running, f"t-{secrets.token_hex(4)}",
                                             [_event(room_id, alice.user_id, "status")])
    # The sentinel: `new` without arguments answers with its usage, after everything above.
    assert await _put(running, f"t-{secrets.token_hex(4)}",
                      [_event(room_id, alice.user_id, "new")]) == 200
    await wait_for_event(alice, room_id,
                         lambda e: e.sender == bot and "Usage: new" in getattr(e, "body", ""))
    history = await room_history(alice, room_id)
    helps = _bot_answers(history, bot, "Cloakroom commands")
    status_answers = _bot_answers(history, bot, "Bot device")
    print(f"\n[faults] transactions, bot command: statuses={statuses}, help_answers={helps}, "
          f"status_answers={status_answers}, s={time.monotonic() - started:.1f}")
    assert statuses["no token"] == 401
    assert statuses["wrong token"] == 403
    assert statuses["first"] == statuses["replay"] == statuses["new txn id, same event"] == 200
    assert statuses["two at once"] == [200, 200]
    assert helps == 1, f"`help` answered {helps} times (forged, replayed or re-sent)"
    assert status_answers == 1, f"`status` answered {status_answers} times"


def _raw_event(env: Env, client: AsyncClient, room_id: str, event_id: str) -> dict[str, Any]:
    """The event as the homeserver stores it (still encrypted): what a transaction carries."""
    path = (f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/event/"
            f"{urllib.parse.quote(event_id)}")
    req = urllib.request.Request(env.synapse.url + path)
    req.add_header("Authorization", f"Bearer {client.access_token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


async def test_a_portal_message_delivered_again_is_mailed_once(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, _ = await _portal(running, alice)
    token = f"replayed-{secrets.token_hex(4)}"
    event_id = await _say(alice, room_id, token, thread=root.event_id)
    # Synapse's own transaction: the mail leaves once.
    await _relay_wait(running, _containing(token))
    raw = await asyncio.to_thread(_raw_event, running, alice, room_id, event_id)
    assert raw["type"] == "m.room.encrypted", raw["type"]
    started = time.monotonic()
    txn = f"again-{secrets.token_hex(4)}"
    statuses = {
        "new txn id, same event": await _put(running, txn, [raw]),
        "replay": await _put(running, txn, [raw]),
        "two at once": await _at_once(running, f"again-{secrets.token_hex(4)}", [raw]),
        "no token": await _put(running, f"f-{secrets.token_hex(4)}", [raw], None),
        "wrong token": await _put(running, f"f-{secrets.token_hex(4)}", [raw], "wrong"),
    }
    # The sentinel goes the ordinary way; once it has left, the outbox has seen everything above.
    sentinel = f"sentinel-{secrets.token_hex(4)}"
    sentinel_id = await send_text(alice, room_id, sentinel)
    await _relay_wait(running, _containing(sentinel))
    db = running.base_dir / "bridge.db"
    await until(lambda: bool(query(db, "SELECT 1 FROM outbox WHERE event_id=? AND state='sent'",
                                   sentinel_id)), what="the sentinel's outbox row sent")
    mailed = len(running.relay.find(_containing(token)))
    rows = query(db, "SELECT COUNT(*) FROM outbox WHERE event_id=?", event_id)[0][0]
    print(f"\n[faults] transactions, portal message: statuses={statuses}, mailed={mailed}, "
          f"outbox_rows={rows}, s={time.monotonic() - started:.1f}")
    assert statuses["new txn id, same event"] == statuses["replay"] == 200
    assert statuses["two at once"] == [200, 200]
    assert (statuses["no token"], statuses["wrong token"]) == (401, 403)
    assert mailed == 1, f"the message was mailed {mailed} times"
