"""The appservice endpoint: only the homeserver's token is accepted, and each transaction once.

Negative checks use ordering instead of sleeps: the bot handles a room's messages strictly in
order, so if a rejected or replayed transaction had been processed, its answer would arrive
before the answer to the valid message sent after it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from .harness import Env, from_sender, open_dm_with_bot, put_transaction, sync_until


def _message_txn(room_id: str, sender: str, body: str) -> dict[str, Any]:
    return {
        "events": [
            {
                "type": "m.room.message",
                "room_id": room_id,
                "sender": sender,
                "event_id": f"$fake-{secrets.token_hex(8)}",
                "origin_server_ts": int(time.time() * 1000),
                "content": {"msgtype": "m.text", "body": body},
            }
        ]
    }


async def _put(env: Env, txn_id: str, body: Any, token: str | None) -> int:
    return await asyncio.to_thread(put_transaction, env, txn_id, body, token)


async def test_forged_transactions_are_rejected_and_not_processed(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    forged = _message_txn(room_id, alice.user_id, "status")

    assert await _put(running, f"forged-{secrets.token_hex(4)}", forged, None) == 401
    assert await _put(running, f"forged-{secrets.token_hex(4)}", forged, "wrong-token") == 403
    # Same length as the real token, one character off: compared in full, not by prefix.
    near = running.hs_token[:-1] + ("a" if running.hs_token[-1] != "a" else "b")
    assert await _put(running, f"forged-{secrets.token_hex(4)}", forged, near) == 403

    valid = _message_txn(room_id, alice.user_id, "help")
    assert await _put(running, f"valid-{secrets.token_hex(4)}", valid, running.hs_token) == 200
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Cloakroom commands" in reply.body, f"a forged transaction was processed: {reply.body}"


async def test_replayed_transaction_is_processed_once_even_across_restart(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    txn_id = f"replay-{secrets.token_hex(4)}"
    status = _message_txn(room_id, alice.user_id, "status")

    assert await _put(running, txn_id, status, running.hs_token) == 200
    _, first = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Bot device" in first.body

    # The same transaction again (same id, same content): acknowledged, not processed.
    assert await _put(running, txn_id, status, running.hs_token) == 200
    assert await _put(running, f"next-{secrets.token_hex(4)}",
                      _message_txn(room_id, alice.user_id, "help"), running.hs_token) == 200
    _, second = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Cloakroom commands" in second.body, f"the replay was processed: {second.body}"

    running.bridge.stop()
    running.bridge.start()
    assert await _put(running, txn_id, status, running.hs_token) == 200
    assert await _put(running, f"after-{secrets.token_hex(4)}",
                      _message_txn(room_id, alice.user_id, "help"), running.hs_token) == 200
    _, third = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Cloakroom commands" in third.body, f"the replay was processed: {third.body}"


async def test_a_reused_transaction_id_with_new_events_is_processed(running: Env) -> None:
    """Synapse reuses transaction ids after it crashed before saving its counter (seen in the
    suite after a homeserver kill): new events under an old id must not be dropped."""
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    txn_id = f"reused-{secrets.token_hex(4)}"
    assert await _put(running, txn_id, _message_txn(room_id, alice.user_id, "status"),
                      running.hs_token) == 200
    _, first = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Bot device" in first.body
    assert await _put(running, txn_id, _message_txn(room_id, alice.user_id, "help"),
                      running.hs_token) == 200
    _, second = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Cloakroom commands" in second.body


async def test_malformed_json_is_rejected(running: Env) -> None:
    token = running.hs_token
    assert await _put(running, f"bad-{secrets.token_hex(4)}", b"{not json", token) == 400
    assert await _put(running, f"bad-{secrets.token_hex(4)}", b"[1, 2]", token) == 400
    assert await _put(running, f"bad-{secrets.token_hex(4)}", b"\xff\xfe", token) == 400
    # A bad body must not need a token check to fail, but a missing token still wins.
    assert await _put(running, f"bad-{secrets.token_hex(4)}", b"{not json", None) == 401
    assert await _put(running, f"ok-{secrets.token_hex(4)}", {"events": []}, token) == 200


async def test_a_transaction_over_1_mib_is_accepted_and_processed(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    # Synapse may send 100 PDUs and 100 EDUs at once: here ~2 MiB, twice aiohttp's default cap.
    body = _message_txn(room_id, alice.user_id, "help")
    filler = {"msgtype": "m.text", "body": "x" * 20_000}
    padding = [dict(body["events"][0], event_id=f"$pad-{secrets.token_hex(8)}",
                    room_id="!elsewhere:localhost", content=filler) for _ in range(100)]
    body["events"] = padding + body["events"]
    assert await _put(running, f"big-{secrets.token_hex(4)}", body, running.hs_token) == 200
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Cloakroom commands" in reply.body


async def test_an_event_sent_again_under_a_new_transaction_id_is_handled_once(
    running: Env,
) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    first = _message_txn(room_id, alice.user_id, "status")
    assert await _put(running, f"one-{secrets.token_hex(4)}", first, running.hs_token) == 200
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Bot device" in reply.body
    # A homeserver that lost track of what it sent: the same event, another transaction.
    assert await _put(running, f"two-{secrets.token_hex(4)}", first, running.hs_token) == 200
    assert await _put(running, f"three-{secrets.token_hex(4)}",
                      _message_txn(room_id, alice.user_id, "help"), running.hs_token) == 200
    _, second = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "Cloakroom commands" in second.body, f"the event was handled twice: {second.body}"
