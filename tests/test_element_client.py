"""Element's crypto stack (matrix-js-sdk + Rust crypto) against the real Synapse and bridge."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

from .element_client import ElementClient, ElementDevices
from .harness import Env
from .mail import make_mail, send, unique
from .test_email_in import PNG_1x1


def _ghost(address: str) -> str:
    return "@_email_" + address.replace("@", "=40") + ":localhost"


async def _bare_user(env: Env) -> tuple[str, str]:
    """A registered user who has never logged in anywhere: (user ID, password)."""
    localpart = f"el{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    await asyncio.to_thread(env.synapse.register_user, localpart, password)
    user_id = f"@{localpart}:{env.synapse.server_name}"
    env.passwords[user_id] = password
    return user_id, password


def _address(user_id: str) -> str:
    return f"{user_id[1:].split(':')[0]}@localhost"


async def _mail(env: Env, user_id: str, text: str, subject: str = "Hello",
                sender: str = "bob@example.org") -> None:
    to = _address(user_id)
    await send(env.smtp_port, make_mail(to=to, sender=f"Bob <{sender}>", subject=subject,
                                        text=text), [to], mail_from=sender)


async def _portal(env: Env, device: ElementClient, subject: str = "Hello") -> tuple[str, str]:
    """Mail from bob to the device's user, accepted: (room, the mail's text event ID)."""
    token = unique("mail")
    await _mail(env, device.user_id, f"Text {token}", subject)
    room_id = await device.accept_invite()
    (msg,) = await device.wait_for_messages(room_id, lambda e: token in e.body)
    return room_id, msg.event_id


async def test_mail_decrypts_in_element_with_no_red_shield(running: Env,
                                                           element: ElementDevices) -> None:
    user_id, password = await _bare_user(running)
    alice = await element.login(user_id, password, "Element A")
    assert alice.user_id == user_id and alice.device_id
    token = unique("plain")
    await _mail(running, user_id, f"Are you free? {token}", "Lunch?")
    room_id = await alice.accept_invite()
    assert any(r["room_id"] == room_id and r["encrypted"] for r in await alice.rooms())
    (msg,) = await alice.wait_for_messages(room_id, lambda e: token in e.body)
    assert msg.encrypted and msg.decrypted and msg.decryption_failure is None
    assert msg.sender == _ghost("bob@example.org")
    assert "Lunch?" in msg.body
    # The ghost sends from its own device, cross-signed by the ghost: no red shield in Element.
    assert msg.shield_colour != "RED", (msg.shield_colour, msg.shield_reason)


async def test_element_reply_is_mailed_out(running: Env, element: ElementDevices) -> None:
    user_id, password = await _bare_user(running)
    alice = await element.login(user_id, password)
    room_id, root = await _portal(running, alice, subject="Plans")
    token = unique("reply")
    event_id = await alice.send_text(room_id, f"Sounds good {token}", thread_root=root)
    (mine,) = await alice.wait_for_messages(room_id, lambda e: e.event_id == event_id)
    assert mine.encrypted and mine.thread_root == root
    (mail,) = await asyncio.to_thread(running.relay.wait_for, lambda r: token.encode() in r.data)
    msg = mail.message
    assert mail.rcpt_tos == ["bob@example.org"]
    assert msg["Subject"] == "Re: Plans"
    assert token in msg.get_body(("plain",)).get_content()


async def test_two_devices_of_one_user_both_decrypt_new_mail(running: Env,
                                                             element: ElementDevices) -> None:
    user_id, password = await _bare_user(running)
    a = await element.login(user_id, password, "A")
    room_id, root = await _portal(running, a)
    b = await element.login(user_id, password, "B")
    assert b.device_id != a.device_id
    assert room_id in {r["room_id"] for r in await b.rooms() if r["membership"] == "join"}
    # Mail right after B's login: the bridge must learn of B's device (MSC3202 device lists) for
    # the ghost's next Megolm session, or B gets MEGOLM_UNKNOWN_INBOUND_SESSION_ID.
    token = unique("later")
    await _mail(running, user_id, f"For both devices {token}")
    for device in (a, b):
        (msg,) = await device.wait_for_messages(room_id, lambda e: token in e.body, timeout=30)
        assert msg.decrypted and msg.shield_colour != "RED", device.device_id
    # B answers in the thread and the bridge mails it out.
    hello = unique("fromB")
    await b.send_text(room_id, f"Hello from B {hello}", thread_root=root)
    sent = await asyncio.to_thread(running.relay.wait_for, lambda r: hello.encode() in r.data)
    assert len(sent) == 1, "the bridge did not mail B's message out"


async def test_cross_signing_and_recovery_on_a_second_device(running: Env,
                                                             element: ElementDevices) -> None:
    user_id, password = await _bare_user(running)
    a = await element.login(user_id, password, "A")
    status = await a.bootstrap_cross_signing(recovery=True)
    assert status["cross_signing_ready"] and status["device_signed_by_owner"], status
    assert status["recovery_key"]
    room_id, root = await _portal(running, a)
    b = await element.login(user_id, password, "B")
    assert not (await b.status())["device_signed_by_owner"]
    # Element flags what a device not yet verified by its owner sends: the shield is live data.
    unsigned = await b.send_text(room_id, "from B, unverified", thread_root=root)
    (seen,) = await a.wait_for_messages(room_id, lambda e: e.event_id == unsigned and e.decrypted)
    assert (seen.shield_colour, seen.shield_reason) == ("RED", "UNSIGNED_DEVICE")
    status = await b.recover(status["recovery_key"])
    assert status["device_signed_by_owner"] and status["cross_signing_ready"], status
    seen_by_a = await a.device_status(user_id, b.device_id)
    assert seen_by_a and seen_by_a["signed_by_owner"] and seen_by_a["cross_signing_verified"]
    signed = await b.send_text(room_id, "from B, verified", thread_root=root)
    await a.wait_for_messages(room_id, lambda e: e.event_id == signed and e.decrypted
                              and e.shield_colour == "NONE")


async def test_a_recovered_device_reads_older_mail_from_the_key_backup(
    running: Env, element: ElementDevices,
) -> None:
    user_id, password = await _bare_user(running)
    a = await element.login(user_id, password, "A")
    recovery_key = (await a.bootstrap_cross_signing(recovery=True))["recovery_key"]
    room_id, old = await _portal(running, a)
    b = await element.login(user_id, password, "B")
    (before,) = await b.wait_for_messages(room_id, lambda e: e.event_id == old)
    # B did not exist when that mail came: only the backup can give it the key (Element says
    # HISTORICAL_MESSAGE_BACKUP_UNCONFIGURED: there is a backup, this device can't use it yet).
    assert before.decryption_failure == "HISTORICAL_MESSAGE_BACKUP_UNCONFIGURED", before.summary()
    status = await b.recover(recovery_key)
    assert status["device_signed_by_owner"] and status["backup_version"], status
    # A backs the key up 0-10 s after it got it: restore again until B has it (with a deadline).
    deadline = asyncio.get_running_loop().time() + 60
    while not any(e.event_id == old and e.decrypted for e in await b.messages(room_id)):
        assert asyncio.get_running_loop().time() < deadline, "the old mail never came from backup"
        await b.restore_key_backup()
    (after,) = await b.wait_for_messages(room_id, lambda e: e.event_id == old and e.decrypted)
    assert after.shield_colour is not None


async def test_encrypted_attachment_downloads_and_decrypts(running: Env,
                                                           element: ElementDevices) -> None:
    user_id, password = await _bare_user(running)
    alice = await element.login(user_id, password)
    to = _address(user_id)
    payload = bytes(range(256)) * 16
    msg = make_mail(to=to, subject="Report")
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="report.pdf")
    msg.add_attachment(PNG_1x1, maintype="image", subtype="png", filename="dot.png")
    await send(running.smtp_port, msg, [to])
    room_id = await alice.accept_invite()
    files = await alice.wait_for_messages(room_id, lambda e: e.msgtype in ("m.file", "m.image"),
                                          count=2)
    pdf = next(e for e in files if e.msgtype == "m.file").content
    assert "url" not in pdf and "file" in pdf
    plain = await alice.download_decrypted(pdf["file"])
    assert hashlib.sha256(plain).digest() == hashlib.sha256(payload).digest()
    assert await alice.download_raw(pdf["file"]) != payload


async def test_restarted_device_keeps_its_keys_and_decrypts_new_mail(
    running: Env, element: ElementDevices,
) -> None:
    user_id, password = await _bare_user(running)
    alice = await element.login(user_id, password)
    room_id, first = await _portal(running, alice)
    device_id = alice.device_id
    await alice.restart()
    assert alice.device_id == device_id
    token = unique("after-restart")
    await _mail(running, user_id, f"After the reload {token}")
    msgs = await alice.wait_for_messages(room_id, count=2)
    assert [m.event_id for m in msgs][0] == first
    assert token in msgs[-1].body and all(m.decrypted for m in msgs)
