"""Every ghost is its own verified sender: a bridged mail is encrypted by the ghost's own device,
which the ghost's own cross-signing identity signs — checked from /keys/query as a client would."""

from __future__ import annotations

import asyncio
import urllib.parse
from typing import Any

from signedjson.sign import verify_signed_json

from .harness import Env, accept_invite, wait_for_event
from .mail import make_mail, send, unique
from .test_identity import _only_key, _verify_key


def _ghost(address: str) -> str:
    return "@_email_" + address.replace("@", "=40") + ":localhost"


async def _encrypted_events(env: Env, token: str, room_id: str) -> list[dict[str, Any]]:
    path = (f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id)}/messages"
            "?dir=b&limit=50")
    resp = await asyncio.to_thread(env.synapse.request, "GET", path, None, token)
    return [e for e in resp["chunk"] if e["type"] == "m.room.encrypted"]


async def _keys(env: Env, token: str, user_id: str) -> dict[str, Any]:
    return await asyncio.to_thread(env.synapse.request, "POST", "/_matrix/client/v3/keys/query",
                                   {"device_keys": {user_id: []}}, token)


def _check_signed_by_own_identity(keys: dict[str, Any], user_id: str, device_id: str,
                                  sender_key: str) -> str:
    device = keys["device_keys"][user_id][device_id]
    assert device["keys"][f"curve25519:{device_id}"] == sender_key, "not that device's key"
    master = keys["master_keys"][user_id]
    self_signing = keys["self_signing_keys"][user_id]
    verify_signed_json(self_signing, user_id, _verify_key(_only_key(master)))
    verify_signed_json(device, user_id, _verify_key(_only_key(self_signing)))
    return _only_key(master)


async def test_mail_is_sent_by_the_ghosts_own_cross_signed_device(running: Env) -> None:
    alice = await running.new_user()
    to = f"{alice.user_id[1:].split(':')[0]}@localhost"
    sender = f"{unique('verified')}@example.org"
    ghost = _ghost(sender)
    await send(running.smtp_port, make_mail(to=to, sender=f"Vera <{sender}>", text="first"),
               [to], mail_from=sender)
    room_id = await accept_invite(alice)
    await wait_for_event(alice, room_id, lambda e: "first" in getattr(e, "body", ""))

    (event,) = [e for e in await _encrypted_events(running, alice.access_token, room_id)
                if e["sender"] == ghost]
    content = event["content"]
    keys = await _keys(running, alice.access_token, ghost)
    master = _check_signed_by_own_identity(keys, ghost, content["device_id"],
                                           content["sender_key"])
    bot_devices = (await _keys(running, alice.access_token, running.bot_mxid))["device_keys"]
    assert content["device_id"] not in bot_devices[running.bot_mxid], "sent by the bot's device"

    # After a restart the ghost keeps its device and its identity.
    running.bridge.stop()
    running.bridge.start()
    await send(running.smtp_port, make_mail(to=to, sender=f"Vera <{sender}>", text="second"),
               [to], mail_from=sender)
    await wait_for_event(alice, room_id, lambda e: "second" in getattr(e, "body", ""))
    events = [e for e in await _encrypted_events(running, alice.access_token, room_id)
              if e["sender"] == ghost]
    assert {e["content"]["device_id"] for e in events} == {content["device_id"]}
    again = await _keys(running, alice.access_token, ghost)
    assert _check_signed_by_own_identity(again, ghost, content["device_id"],
                                         content["sender_key"]) == master
    assert list(again["device_keys"][ghost]) == [content["device_id"]], "a second device"
