"""A reply whose room key comes late, with the real stack: Synapse, the bridge, nio, the relay.

The reply is encrypted with a Megolm session the client has not shared yet, and sent through
the raw client API; the key goes out later. The bridge must keep the event (it answered 200 for
its transaction) and mail it once the key arrives — also across a SIGKILL in between.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sqlite3
import time
import urllib.request
from typing import Any

from nio import AsyncClient
from nio.crypto.sessions import OutboundGroupSession
from ruamel.yaml import YAML

from .harness import Env, sync_until
from .mail import unique
from .test_email_out import _containing, _portal, _relay_wait, _say


def _thread_reply(root: str, body: str) -> dict[str, Any]:
    return {
        "msgtype": "m.text", "body": body,
        "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": True,
                         "m.in_reply_to": {"event_id": root}},
    }


def _put_event(env: Env, client: AsyncClient, room_id: str, payload: dict[str, Any]) -> str:
    txn = secrets.token_hex(8)
    req = urllib.request.Request(
        f"{env.synapse.url}/_matrix/client/v3/rooms/{room_id}/send/m.room.encrypted/{txn}",
        data=json.dumps(payload).encode(), method="PUT",
        headers={"Authorization": f"Bearer {client.access_token}",
                 "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["event_id"]


class _SharedFromTheStart(OutboundGroupSession):
    """Shares the session key as it was before the first message, as a client that sent its
    key on time would have (nio would share the ratchet as it is now, past that message)."""

    first_key: str

    @property
    def session_key(self) -> str:
        return self.first_key


async def _send_with_key_withheld(env: Env, client: AsyncClient, room_id: str,
                                  content: dict[str, Any]) -> str:
    """Encrypt with a fresh outbound session that nobody has received yet, and send it."""
    olm = client.olm
    olm.create_outbound_group_session(room_id)
    session = olm.outbound_group_sessions[room_id]
    first_key = session.session_key
    session.shared = True  # nio refuses to encrypt with a session it believes unshared
    payload = olm.group_encrypt(room_id, {"type": "m.room.message", "content": content})
    session.shared = False
    session.__class__ = _SharedFromTheStart
    session.first_key = first_key
    return await asyncio.to_thread(_put_event, env, client, room_id, payload)


async def _release_key(client: AsyncClient, room_id: str) -> None:
    """Share that same session with every device in the room (the bot's among them)."""
    await client.joined_members(room_id)
    if client.should_query_keys:
        await client.keys_query()
    await client.share_group_session(room_id, ignore_unverified_devices=True)


def _inbox_row(env: Env, event_id: str) -> tuple[str, bool] | None:
    """(txn_id, whether that transaction is recorded as done) for the event's inbox row."""
    with sqlite3.connect(env.base_dir / "bridge.db") as conn:
        row = conn.execute(
            "SELECT txn_id FROM matrix_inbox WHERE event_id=?", (event_id,)
        ).fetchone()
        if row is None:
            return None
        done = conn.execute(
            "SELECT 1 FROM appservice_txn WHERE txn_id=?", (row[0],)
        ).fetchone()
    return row[0], done is not None


async def _wait_until_acknowledged(env: Env, event_id: str) -> None:
    """Poll the bridge's database until the event is stored and its transaction answered."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = _inbox_row(env, event_id)
        if found and found[1]:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"{event_id} never reached the inbox with its transaction recorded")


async def test_a_reply_whose_key_comes_late_is_mailed_once(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, _ = await _portal(running, alice, f"{unique('late')}@example.org")
    token = unique("latekey")
    event_id = await _send_with_key_withheld(
        running, alice, room_id, _thread_reply(root.event_id, token)
    )
    await _wait_until_acknowledged(running, event_id)
    assert not running.relay.find(_containing(token))  # nothing could be read yet
    await _release_key(alice, room_id)
    await _relay_wait(running, _containing(token))
    sentinel = unique("sentinel")
    await _say(alice, room_id, sentinel, thread=root.event_id)
    await _relay_wait(running, _containing(sentinel))
    assert len(running.relay.find(_containing(token))) == 1
    assert _inbox_row(running, event_id) is None  # handled rows are deleted


async def test_a_reply_survives_sigkill_after_the_200_and_is_mailed_once(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, _ = await _portal(running, alice, f"{unique('kill')}@example.org")
    token = unique("killed")
    event_id = await _send_with_key_withheld(
        running, alice, room_id, _thread_reply(root.event_id, token)
    )
    # Synapse has its 200: it will never send this transaction again.
    await _wait_until_acknowledged(running, event_id)
    running.bridge.stop(signal.SIGKILL)
    running.bridge.start()
    await _release_key(alice, room_id)
    after = unique("after")
    await _say(alice, room_id, after, thread=root.event_id)
    await _relay_wait(running, _containing(after))
    await _relay_wait(running, _containing(token))
    assert len(running.relay.find(_containing(token))) == 1
    assert len(running.relay.find(_containing(after))) == 1


async def test_a_reply_never_readable_gets_a_notice_not_silence(running: Env) -> None:
    """With a short bound (set for this test only), a key that never comes ends in a notice
    replying to the message, and nothing is mailed."""
    config_path = running.bridge.config_path
    original = config_path.read_text()
    yaml = YAML()
    config = yaml.load(original)
    config["bridge"]["undecryptable_after_seconds"] = 3
    running.bridge.stop()
    with config_path.open("w") as f:
        yaml.dump(config, f)
    try:
        running.bridge.start()
        alice = await running.new_user()
        room_id, root, _ = await _portal(running, alice, f"{unique('never')}@example.org")
        token = unique("never")
        event_id = await _send_with_key_withheld(
            running, alice, room_id, _thread_reply(root.event_id, token)
        )
        _, notice = await sync_until(
            alice,
            lambda rid, e: rid == room_id and e.sender == running.bot_mxid
            and "could not read your message, so it was not mailed" in getattr(e, "body", ""),
            timeout=60,
        )
        relates = notice.source["content"].get("m.relates_to", {})
        assert relates.get("m.in_reply_to", {}).get("event_id") == event_id
        assert _inbox_row(running, event_id) is None
        assert not running.relay.find(_containing(token))
    finally:
        running.bridge.stop()
        config_path.write_text(original)
        running.bridge.start()
