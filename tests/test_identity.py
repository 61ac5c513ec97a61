"""The bot's device identity as any client sees it, and that it survives a restart."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import pytest
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import SignatureVerifyException, verify_signed_json
from unpaddedbase64 import decode_base64

from bridge.crypto.sealed import unseal

from .harness import Env, from_sender, open_dm_with_bot, send_text, sync_until


def _verify_key(public: str) -> Any:
    return decode_verify_key_bytes(f"ed25519:{public}", decode_base64(public))


def _only_key(keys: dict[str, Any]) -> str:
    (public,) = keys["keys"].values()
    return public


async def _query_bot_keys(env: Env, token: str) -> dict[str, Any]:
    return await asyncio.to_thread(
        env.synapse.request,
        "POST",
        "/_matrix/client/v3/keys/query",
        {"device_keys": {env.bot_mxid: []}},
        token,
    )


def _bot_devices(keys: dict[str, Any], bot: str) -> dict[str, Any]:
    return keys["device_keys"][bot]


async def test_bot_device_is_signed_by_its_self_signing_key(running: Env) -> None:
    alice = await running.new_user()
    keys = await _query_bot_keys(running, alice.access_token)
    bot = running.bot_mxid
    master = keys["master_keys"][bot]
    self_signing = keys["self_signing_keys"][bot]
    devices = _bot_devices(keys, bot)
    assert len(devices) == 1, f"the bot should have exactly one device: {list(devices)}"
    (device,) = devices.values()

    master_vk = _verify_key(_only_key(master))
    ssk_vk = _verify_key(_only_key(self_signing))
    # The chain a client walks: master key → self-signing key → device.
    verify_signed_json(self_signing, bot, master_vk)
    verify_signed_json(device, bot, ssk_vk)
    assert "self_signing" in self_signing["usage"]

    # The check above must be able to fail: a device whose keys changed is not signed.
    forged = {**device, "keys": {**device["keys"], "curve25519:X": "AAAA"}}
    with pytest.raises(SignatureVerifyException):
        verify_signed_json(forged, bot, ssk_vk)


async def test_restart_keeps_device_and_both_directions_decrypt(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await send_text(alice, room_id, "status")
    _, before = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert before.decrypted
    keys_before = _bot_devices(await _query_bot_keys(running, alice.access_token), running.bot_mxid)

    assert running.bridge.stop() == 0, "the bridge did not exit cleanly on SIGTERM"
    running.bridge.start()

    keys_after = _bot_devices(await _query_bot_keys(running, alice.access_token), running.bot_mxid)
    assert keys_after == keys_before, "the bot's device or its keys changed across the restart"
    (device_id,) = keys_after

    # Alice's existing Megolm session must still decrypt on the bridge side (stored inbound
    # session), and the bot's reply must decrypt on Alice's side.
    await send_text(alice, room_id, "status")
    _, after = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert after.decrypted
    assert f"Bot device: {device_id}" in after.body

    # A user who meets the bot only after the restart works too (new Olm sessions).
    bob = await running.new_user()
    bob_room = await open_dm_with_bot(bob, running.bot_mxid)
    await send_text(bob, bob_room, "help")
    _, reply = await sync_until(bob, from_sender(bob_room, running.bot_mxid))
    assert reply.decrypted


async def test_recovery_key_is_sealed_in_the_database_and_never_logged(running: Env) -> None:
    db_path = running.base_dir / "bridge.db"
    assert db_path.stat().st_mode & 0o077 == 0, "the bridge database is readable by others"
    with sqlite3.connect(db_path) as conn:
        (sealed,) = conn.execute(
            "SELECT value FROM bridge_state WHERE key=?",
            (f"crypto:{running.bot_mxid}:recovery_key",),
        ).fetchone()
    recovery_key = unseal(running.config["encryption"]["pickle_key"], "recovery_key", sealed)
    assert len(recovery_key.replace(" ", "")) >= 40  # base58 of a 32-byte key plus header
    assert recovery_key not in sealed
    log = running.bridge.log_path.read_text(errors="replace")
    for form in (recovery_key, recovery_key.replace(" ", "")):
        assert form not in log, "the recovery key was logged"
