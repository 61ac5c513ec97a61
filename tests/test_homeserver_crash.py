"""Exactly once across a homeserver crash: why the bridge sends as each identity's own device.

Synapse remembers the transaction id of a `PUT /send` made by an appservice *without* a device
only in memory; with device masquerading (the identity's MSC4190 device) it stores the id with
the event, so a retry of the same request after Synapse crashed returns the same event instead of
posting the mail a second time.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import urllib.parse
import urllib.request

from .harness import Env, accept_invite
from .mail import make_mail, send, unique
from .test_every_device import local, texts


def _put(env: Env, room_id: str, txn_id: str, user_id: str, device_id: str | None,
         body: str) -> str:
    query = {"user_id": user_id}
    if device_id:
        query["org.matrix.msc3202.device_id"] = device_id
        query["device_id"] = device_id
    path = (f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/send/m.room.message/"
            f"{txn_id}?{urllib.parse.urlencode(query)}")
    req = urllib.request.Request(env.synapse.url + path, method="PUT",
                                 data=json.dumps({"msgtype": "m.notice", "body": body}).encode())
    req.add_header("Authorization", f"Bearer {env.config['appservice']['as_token']}")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())["event_id"]


def _ghost_device(env: Env, ghost: str) -> str:
    db = env.config["database"].removeprefix("sqlite:")
    conn = sqlite3.connect(db, timeout=10)
    try:
        (device_id,) = conn.execute(
            "SELECT value FROM bridge_state WHERE key=?", (f"crypto:{ghost}:device_id",)
        ).fetchone()
        return device_id
    finally:
        conn.close()


def _crash_and_restart_synapse(env: Env) -> None:
    assert env.synapse.process is not None
    env.synapse.process.send_signal(signal.SIGKILL)
    env.synapse.process.wait()
    env.synapse.process = None
    env.synapse.start()


async def test_bridged_mail_is_sent_as_the_ghost_s_device(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    token = unique("device")
    await send(running.smtp_port, make_mail(to=to, text=token), [to])
    room_id = await accept_invite(alice)
    (msg,) = await texts(alice, room_id, 1)
    assert token in msg.body
    # The homeserver's own record of the transaction, by device, is what makes a retry safe.
    hs_db = running.synapse.base_dir / "data" / "homeserver.db"
    conn = sqlite3.connect(hs_db, timeout=10)
    try:
        rows = conn.execute(
            "SELECT device_id, txn_id FROM event_txn_id_device_id WHERE event_id=?",
            (msg.event_id,),
        ).fetchall()
    finally:
        conn.close()
    assert len(rows) == 1, rows
    device_id, txn_id = rows[0]
    assert device_id == _ghost_device(running, msg.sender)
    assert txn_id.startswith("cloakroom.")


async def test_a_retry_after_a_homeserver_crash_is_not_posted_twice(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    await send(running.smtp_port, make_mail(to=to, text=unique("setup")), [to])
    room_id = await accept_invite(alice)
    (msg,) = await texts(alice, room_id, 1)
    ghost, device = msg.sender, _ghost_device(running, msg.sender)
    txn = unique("txn")
    first = await asyncio.to_thread(_put, running, room_id, txn, ghost, device, "once")
    await asyncio.to_thread(_crash_and_restart_synapse, running)
    again = await asyncio.to_thread(_put, running, room_id, txn, ghost, device, "once")
    assert again == first, "Synapse posted the retried request a second time"
    # Without the device, the same retry after a crash is a second event: the reason the
    # bridge never sends that way.
    bare = unique("bare")
    before = await asyncio.to_thread(_put, running, room_id, bare, ghost, None, "bare")
    await asyncio.to_thread(_crash_and_restart_synapse, running)
    after = await asyncio.to_thread(_put, running, room_id, bare, ghost, None, "bare")
    assert after != before
