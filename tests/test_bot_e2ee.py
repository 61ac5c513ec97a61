"""The bot in an end-to-end encrypted DM, against a real Synapse, checked by a real nio client."""

from __future__ import annotations

from nio import RoomEncryptionEvent, RoomMemberEvent
from nio.api import RoomPreset

from .harness import Env, from_sender, open_dm_with_bot, send_text, sync_until


async def test_help_is_answered_encrypted(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await send_text(alice, room_id, "help")
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    # nio marks events it decrypted itself; a plaintext reply would have decrypted=False.
    assert reply.decrypted, "the bot's reply was not encrypted"
    assert "Cloakroom commands" in reply.body
    assert "status" in reply.body


async def test_status_reports_device_cross_signing_and_room(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await send_text(alice, room_id, "status")
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert reply.decrypted
    assert "Device cross-signed by the bot: yes" in reply.body
    assert "This room is encrypted: yes" in reply.body
    assert "Homeserver: localhost" in reply.body


async def test_unknown_command_points_to_help(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await send_text(alice, room_id, "frobnicate")
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert reply.decrypted
    assert "Unknown command 'frobnicate'" in reply.body
    assert "help" in reply.body


async def test_bot_turns_encryption_on_in_unencrypted_dm(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid, encrypted=False)
    _, evt = await sync_until(
        alice, lambda rid, e: rid == room_id and isinstance(e, RoomEncryptionEvent)
    )
    assert evt.sender == running.bot_mxid
    await send_text(alice, room_id, "help")
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert reply.decrypted


async def test_bot_says_why_it_cannot_turn_encryption_on(running: Env) -> None:
    alice = await running.new_user()
    # private_chat gives the invitee power level 0; m.room.encryption needs 100.
    room_id = await open_dm_with_bot(
        alice, running.bot_mxid, encrypted=False, preset=RoomPreset.private_chat
    )
    _, notice = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    assert "couldn't turn on encryption" in notice.body
    assert "Security & Privacy" in notice.body
    assert alice.rooms[room_id].encrypted is False


async def test_unpermitted_user_is_refused(running: Env) -> None:
    outsider = await running.new_user("outsider")
    resp = await outsider.room_create(is_direct=True, invite=[running.bot_mxid])
    room_id = resp.room_id
    _, evt = await sync_until(
        outsider,
        lambda rid, e: rid == room_id
        and isinstance(e, RoomMemberEvent)
        and e.state_key == running.bot_mxid
        and e.membership == "leave",
    )
    assert "not allowed" in evt.content.get("reason", "")


async def test_unpermitted_member_gets_polite_refusal_in_shared_room(running: Env) -> None:
    alice = await running.new_user()
    outsider = await running.new_user("outsider2")
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await alice.room_invite(room_id, outsider.user_id)
    await sync_until(outsider, lambda rid, e: rid == room_id)
    await outsider.join(room_id)
    await sync_until(
        outsider,
        lambda rid, e: rid == room_id
        and isinstance(e, RoomMemberEvent)
        and e.state_key == outsider.user_id
        and e.membership == "join",
    )
    # Without the prefix, conversation in a shared room is not for the bot.
    await send_text(outsider, room_id, "help")
    await send_text(outsider, room_id, "!cloakroom help")
    _, reply = await sync_until(outsider, from_sender(room_id, running.bot_mxid))
    assert reply.decrypted
    assert "not allowed to use Cloakroom" in reply.body


async def test_bot_never_answers_in_plaintext(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(
        alice, running.bot_mxid, encrypted=False, preset=RoomPreset.private_chat
    )
    _, first = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    await send_text(alice, room_id, "help")
    _, reply = await sync_until(alice, from_sender(room_id, running.bot_mxid))
    # encryption.require: the command's answer is withheld; only the explanation is plain.
    assert "Cloakroom commands" not in reply.body
    assert reply.body == first.body and "only talk in encrypted rooms" in reply.body
