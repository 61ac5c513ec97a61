"""Welcome DM, security checkup and nudges, against the onboarding bridge (guard and welcome on).

Cross-signing and key backups are set up the way a client would, with raw client-server API
calls (matrix-nio cannot upload cross-signing keys); the bot only ever looks.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import olm
from canonicaljson import encode_canonical_json
from mautrix.util.async_db import Database
from nio import AsyncClient, AsyncClientConfig, Event, LoginResponse
from ruamel.yaml import YAML

from bridge.onboarding.checkup import Identity, device_status
from bridge.onboarding.local_users import LocalUserStore

from . import mail
from .harness import (
    ENCRYPTION_STATE,
    Env,
    is_invite,
    open_dm_with_bot,
    room_history,
    send_text,
    sync_until,
    wait_for_event,
)

ONB_BOT = "@onboarding:localhost"
CHECKUP = "Encryption checkup"
NUDGE = "signed in to your account"


def _body(event: Event) -> str:
    return getattr(event, "body", "") or ""


async def api(client: AsyncClient, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {client.access_token}"}
    async with aiohttp.ClientSession() as session, session.request(
        method, client.homeserver + path, json=body, headers=headers
    ) as resp:
        return resp.status, await resp.json()


async def accept_welcome(user: AsyncClient) -> str:
    """Wait for the onboarding bot's DM invite, join, and return the room."""
    room_id, _ = await sync_until(
        user,
        lambda rid, e: is_invite(e) and e.sender == ONB_BOT and e.state_key == user.user_id,
        timeout=60,
    )
    await user.join(room_id)
    return room_id


async def welcomed(env: Env, name: str) -> tuple[AsyncClient, str, Event]:
    """A new user the onboarding bridge has seen: (client, welcome DM, welcome message)."""
    user = await env.new_user(name)
    # Any event of theirs will do; an encrypted room, so the encryption guard leaves it alone.
    await user.room_create(initial_state=[ENCRYPTION_STATE])
    room_id = await accept_welcome(user)
    welcome = await wait_for_event(
        user, room_id, lambda e: e.sender == ONB_BOT and CHECKUP in _body(e)
    )
    return user, room_id, welcome


async def ask(user: AsyncClient, room_id: str, text: str, marker: str) -> Event:
    """Send a command in the DM and return the bot's answer containing marker."""
    await send_text(user, room_id, text)
    _, reply = await sync_until(
        user, lambda rid, e: rid == room_id and e.sender == ONB_BOT and marker in _body(e)
    )
    return reply


async def another_session(env: Env, user: AsyncClient, name: str) -> AsyncClient:
    """The same user logs in again (a new device with its own keys), like a new phone."""
    store = env.base_dir / "nio" / f"{user.user_id[1:].split(':')[0]}-{name}"
    store.mkdir(parents=True, exist_ok=True)
    client = AsyncClient(
        user.homeserver, user.user_id, store_path=str(store),
        config=AsyncClientConfig(encryption_enabled=True),
    )
    env.clients.append(client)
    resp = await client.login(env.passwords[user.user_id], device_name=name)
    assert isinstance(resp, LoginResponse), resp
    await client.keys_upload()
    return client


def _sign(key: olm.PkSigning, obj: dict[str, Any]) -> str:
    unsigned = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return key.sign(encode_canonical_json(unsigned).decode())


def cross_signing_key(
    user_id: str, key: olm.PkSigning, usage: str, signer: olm.PkSigning | None = None
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "user_id": user_id, "usage": [usage], "keys": {f"ed25519:{key.public_key}": key.public_key}
    }
    if signer:
        obj["signatures"] = {user_id: {f"ed25519:{signer.public_key}": _sign(signer, obj)}}
    return obj


class CrossSigning:
    """A user's cross-signing identity, made and published as a client does it."""

    def __init__(self, user: AsyncClient) -> None:
        self.user = user
        self.master, self.ssk, self.usk = (
            olm.PkSigning(olm.PkSigning.generate_seed()) for _ in range(3)
        )

    def _key(self, key: olm.PkSigning, usage: str, signer: olm.PkSigning | None = None) -> dict:
        return cross_signing_key(self.user.user_id, key, usage, signer)

    async def publish(self) -> None:
        body = {
            "master_key": self._key(self.master, "master"),
            "self_signing_key": self._key(self.ssk, "self_signing", self.master),
            "user_signing_key": self._key(self.usk, "user_signing", self.master),
        }
        # A first upload needs no user-interactive auth (MSC3967).
        status, resp = await api(self.user, "POST", "/_matrix/client/v3/keys/device_signing/upload",
                                 body)
        assert status == 200, resp

    async def sign_device(self, device_id: str) -> None:
        uid = self.user.user_id
        _, resp = await api(self.user, "POST", "/_matrix/client/v3/keys/query",
                            {"device_keys": {uid: [device_id]}})
        device = resp["device_keys"][uid][device_id]
        device.pop("unsigned", None)
        device["signatures"] = {uid: {f"ed25519:{self.ssk.public_key}": _sign(self.ssk, device)}}
        status, resp = await api(self.user, "POST", "/_matrix/client/v3/keys/signatures/upload",
                                 {uid: {device_id: device}})
        assert status == 200 and not resp.get("failures"), resp


async def create_backup(user: AsyncClient) -> str:
    body = {
        "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2",
        "auth_data": {"public_key": olm.PkDecryption().public_key},
    }
    status, resp = await api(user, "POST", "/_matrix/client/v3/room_keys/version", body)
    assert status == 200, resp
    return resp["version"]


async def nudges(user: AsyncClient, room_id: str) -> list[str]:
    return [
        _body(e) for e in await room_history(user, room_id)
        if e.sender == ONB_BOT and NUDGE in _body(e)
    ]


async def test_welcome_dm_reports_what_is_missing(onboarding: Env) -> None:
    user, room_id, welcome = await welcomed(onboarding, "onb9")
    assert welcome.decrypted, "the welcome was not encrypted"
    assert user.rooms[room_id].encrypted
    body = _body(welcome)
    assert "onb9@localhost" in body
    assert "no cross-signing identity" in body
    # The unverified session by name and id, and the concrete steps for each missing item.
    assert f"“test” ({user.device_id})" in body
    assert "Set up Secure Backup" in body
    assert "no server-side key backup" in body
    assert "All clear" not in body


async def test_checkup_sees_cross_signing_and_backup(onboarding: Env) -> None:
    user, room_id, _ = await welcomed(onboarding, "onb10")
    identity = CrossSigning(user)
    await identity.publish()
    await identity.sign_device(user.device_id)
    reply = _body(await ask(user, room_id, "checkup", CHECKUP))
    assert "you have a cross-signing identity" in reply
    assert "your one session is verified" in reply
    assert "no server-side key backup" in reply
    assert "All clear" not in reply

    version = await create_backup(user)
    reply = _body(await ask(user, room_id, "checkup", CHECKUP))
    assert f"a server-side key backup exists (version {version})" in reply
    assert "All clear" in reply
    # Still one DM: neither the commands nor the key changes opened another.
    with_bot = [r for r in user.rooms.values() if ONB_BOT in r.users]
    assert len(with_bot) == 1


async def test_new_unverified_session_gets_one_nudge(onboarding: Env) -> None:
    user, room_id, _ = await welcomed(onboarding, "onb11")
    identity = CrossSigning(user)
    await identity.publish()
    await identity.sign_device(user.device_id)

    laptop = await another_session(onboarding, user, "laptop")
    nudge = await wait_for_event(user, room_id, lambda e: NUDGE in _body(e))
    assert nudge.sender == ONB_BOT and nudge.decrypted
    assert f"“laptop” ({laptop.device_id})" in _body(nudge)
    assert user.device_id not in _body(nudge)  # the verified session is not mentioned

    # Within the interval a third unverified session brings no second message. The checkup
    # answer is the sentinel: it lists the phone, so the bridge has seen it by then.
    phone = await another_session(onboarding, user, "phone")
    await asyncio.sleep(1)
    reply = _body(await ask(user, room_id, "checkup", CHECKUP))
    assert phone.device_id in reply and laptop.device_id in reply
    assert len(await nudges(user, room_id)) == 1


async def test_checkup_off_stops_unsolicited_messages(onboarding: Env) -> None:
    user, room_id, _ = await welcomed(onboarding, "onb12")
    reply = _body(await ask(user, room_id, "checkup off", "Reminders are off"))
    assert "won't write to you unasked" in reply

    tablet = await another_session(onboarding, user, "tablet")
    await asyncio.sleep(1)
    reply = _body(await ask(user, room_id, "checkup", CHECKUP))
    assert tablet.device_id in reply
    assert await nudges(user, room_id) == []

    # Back on, the next new session is worth a message again.
    await ask(user, room_id, "checkup on", "Reminders are on")
    watch = await another_session(onboarding, user, "watch")
    nudge = await wait_for_event(user, room_id, lambda e: NUDGE in _body(e))
    assert watch.device_id in _body(nudge) and tablet.device_id not in _body(nudge)


async def test_first_mail_brings_the_welcome(onboarding: Env) -> None:
    user = await onboarding.new_user("onb13")
    config = YAML(typ="safe").load((onboarding.base_dir / "config-onboarding.yaml").read_text())
    # The user has done nothing in Matrix: only the mail can make the bridge greet them.
    await mail.send(config["email"]["listen"]["port"], mail.make_mail(to="onb13@localhost"),
                    ["onb13@localhost"])
    room_id = await accept_welcome(user)
    welcome = await wait_for_event(
        user, room_id, lambda e: e.sender == ONB_BOT and CHECKUP in _body(e)
    )
    assert "onb13@localhost" in _body(welcome)


async def test_checkup_without_the_guard_namespace_says_backup_unknown(running: Env) -> None:
    # The main bridge runs with the guard off: it may not act as users, so it cannot look.
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await send_text(alice, room_id, "checkup")
    _, reply = await sync_until(
        alice, lambda rid, e: rid == room_id and CHECKUP in _body(e)
    )
    assert reply.sender == running.bot_mxid and reply.decrypted
    assert "I could not check whether you have one" in _body(reply)
    assert "no cross-signing identity" in _body(reply)
    # onboarding.welcome is off on this bridge: alice's events brought no welcome DM.
    await alice.sync(timeout=0)
    assert not alice.invited_rooms


# The signature chain, checked without a homeserver: what a forged or broken identity looks like.

USER = "@carol:hs"


def _new_key() -> olm.PkSigning:
    return olm.PkSigning(olm.PkSigning.generate_seed())


def _device(device_id: str, name: str, signer: olm.PkSigning | None = None) -> dict[str, Any]:
    device: dict[str, Any] = {
        "user_id": USER, "device_id": device_id, "algorithms": ["m.megolm.v1.aes-sha2"],
        "keys": {f"ed25519:{device_id}": _new_key().public_key}, "signatures": {},
        "unsigned": {"device_display_name": name},
    }
    if signer:
        device["signatures"] = {USER: {f"ed25519:{signer.public_key}": _sign(signer, device)}}
    return device


def _keys(master: olm.PkSigning | None, ssk: olm.PkSigning, ssk_signer: olm.PkSigning | None,
          devices: dict[str, dict[str, Any]]) -> dict[str, Any]:
    resp: dict[str, Any] = {"device_keys": {USER: devices}}
    if master:
        resp["master_keys"] = {USER: cross_signing_key(USER, master, "master")}
    resp["self_signing_keys"] = {USER: cross_signing_key(USER, ssk, "self_signing", ssk_signer)}
    return resp


def test_chain_master_to_self_signing_to_device() -> None:
    master, ssk = _new_key(), _new_key()
    resp = _keys(master, ssk, master, {"AAA": _device("AAA", "laptop", ssk),
                                       "BBB": _device("BBB", "phone")})
    status = device_status(resp, USER)
    assert status.identity == Identity.OK
    assert [d.device_id for d in status.devices] == ["AAA", "BBB"]
    assert [(d.device_id, d.name) for d in status.unsigned] == [("BBB", "phone")]


def test_self_signing_key_not_signed_by_master_signs_nothing() -> None:
    master, ssk = _new_key(), _new_key()
    resp = _keys(master, ssk, _new_key(), {"AAA": _device("AAA", "laptop", ssk)})
    status = device_status(resp, USER)
    assert status.identity == Identity.BROKEN
    assert [d.device_id for d in status.unsigned] == ["AAA"]


def test_no_master_key_is_no_identity() -> None:
    ssk = _new_key()
    status = device_status(_keys(None, ssk, None, {"AAA": _device("AAA", "x", ssk)}), USER)
    assert status.identity == Identity.MISSING
    assert [d.device_id for d in status.unsigned] == ["AAA"]


def test_signed_device_keys_that_were_altered_or_moved_are_not_signed() -> None:
    master, ssk = _new_key(), _new_key()
    altered = _device("AAA", "laptop", ssk)
    altered["keys"]["curve25519:AAA"] = "injected"
    moved = _device("BBB", "phone", ssk)
    resp = _keys(master, ssk, master, {"AAA": altered, "CCC": moved})
    status = device_status(resp, USER)
    assert status.identity == Identity.OK
    assert [d.device_id for d in status.unsigned] == ["AAA", "CCC"]


async def test_local_user_rows_round_trip(db: Database) -> None:
    store = LocalUserStore(db)
    assert await store.get("@dave:hs") is None
    await store.set_checkup_off("@dave:hs", True)
    row = await store.get("@dave:hs")
    assert row is not None and row.checkup_off and row.welcomed_at is None
    assert row.known_devices == []
    await store.set_dm("@dave:hs", "!dm:hs")
    await store.set_welcomed("@dave:hs", ["B", "A with space"])
    await store.set_devices("@dave:hs", ["C", "A with space"], 1234)
    await store.set_checkup_off("@dave:hs", False)
    row = await store.get("@dave:hs")
    assert row is not None and not row.checkup_off and row.dm_room_id == "!dm:hs"
    assert row.welcomed_at and row.last_nudge_at == 1234
    assert row.known_devices == ["A with space", "C"]


async def test_the_welcome_greets_by_display_name(onboarding: Env) -> None:
    user = await onboarding.new_user("onb14")
    await user.set_displayname("Fourteen Example")
    await user.room_create(initial_state=[ENCRYPTION_STATE])
    room_id = await accept_welcome(user)
    welcome = await wait_for_event(
        user, room_id, lambda e: e.sender == ONB_BOT and CHECKUP in _body(e)
    )
    assert _body(welcome).startswith("Hello Fourteen Example,"), _body(welcome)[:80]
