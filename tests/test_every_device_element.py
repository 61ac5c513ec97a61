"""Every device of the reader can read every message, with Element's own crypto stack.

matrix-js-sdk with the Rust crypto (tests/element_client.py) as the reader's client, played in
the order things really happen; the matrix-nio versions are in tests/test_every_device.py.
"""

from __future__ import annotations

import asyncio
import signal
from email import message_from_bytes
from email.policy import default

from ruamel.yaml import YAML

from .element_client import ElementClient, ElementDevices, ElementEvent
from .harness import Env
from .mail import unique
from .stack import ONBOARDING_USERS, STRICT_USERS
from .test_every_device import (
    PNG_1x1,
    bridge_db,
    device_change_seen,
    held,
    local,
    mail,
    query,
    until,
)


def reads(*tokens: str):
    """A predicate: a decrypted message carrying one of the tokens."""
    return lambda e: e.decrypted and e.decryption_failure is None and any(
        t in e.body for t in tokens)


async def knows_device(env: Env, device: ElementClient, db=None) -> None:
    """See tests.test_every_device.bridge_knows_device."""
    await until(lambda: device_change_seen(db or bridge_db(env), device.user_id,
                                           device.device_id),
                what=f"the bridge hearing of device {device.device_id}")


def not_red(event: ElementEvent) -> None:
    assert event.shield_colour != "RED", (event.shield_colour, event.shield_reason)


async def test_first_login_reads_mail_attachment_and_second_mail(running: Env,
                                                               element: ElementDevices) -> None:
    user_id, password = await running.register()
    first, second = unique("before"), unique("after")
    await mail(running, f"{local(user_id)}@localhost", first, attachment=PNG_1x1)
    await until(lambda: held(running, user_id) == 1, what="the mail being held")

    phone = await element.login(user_id, password, "first phone")
    room_id = await phone.accept_invite()
    (text,) = await phone.wait_for_messages(room_id, reads(first))
    not_red(text)
    (image,) = await phone.wait_for_messages(room_id, lambda e: e.msgtype == "m.image"
                                             and e.decrypted)
    assert await phone.download_decrypted(image.content["file"]) == PNG_1x1
    await mail(running, f"{local(user_id)}@localhost", second)
    await phone.wait_for_messages(room_id, reads(second))


async def test_new_device_reads_the_next_mail(running: Env, element: ElementDevices) -> None:
    user_id, password = await running.register()
    to = f"{local(user_id)}@localhost"
    laptop = await element.login(user_id, password, "laptop")
    one, two = unique("one"), unique("two")
    await mail(running, to, one)
    room_id = await laptop.accept_invite()
    await laptop.wait_for_messages(room_id, reads(one))

    phone = await element.login(user_id, password, "phone")  # no backup, not verified
    await knows_device(running, phone)
    await mail(running, to, two)
    (on_phone,) = await phone.wait_for_messages(room_id, reads(two))
    not_red(on_phone)
    await laptop.wait_for_messages(room_id, reads(two))


async def test_group_ghosts_both_reach_a_new_device(running: Env,
                                                  element: ElementDevices) -> None:
    user_id, password = await running.register()
    to = f"{local(user_id)}@localhost"
    laptop = await element.login(user_id, password, "laptop")
    bob, carol = "Bob <bob@example.org>", "Carol <carol@example.net>"
    start = unique("start")
    await mail(running, to, start, sender=bob, cc="carol@example.net")
    room_id = await laptop.accept_invite()
    await laptop.wait_for_messages(room_id, reads(start))

    phone = await element.login(user_id, password, "phone")
    await knows_device(running, phone)
    from_bob, from_carol = unique("bob"), unique("carol")
    await mail(running, to, from_bob, sender=bob, cc="carol@example.net")
    await mail(running, to, from_carol, sender=carol, cc="bob@example.org")
    found = await phone.wait_for_messages(room_id, reads(from_bob, from_carol), count=2)
    assert {e.sender for e in found} == {
        "@_email_bob=40example.org:localhost", "@_email_carol=40example.net:localhost"}


async def test_device_added_while_the_bridge_was_down(running: Env,
                                                     element: ElementDevices) -> None:
    user_id, password = await running.register()
    to = f"{local(user_id)}@localhost"
    laptop = await element.login(user_id, password, "laptop")
    one = unique("one")
    await mail(running, to, one)
    room_id = await laptop.accept_invite()
    await laptop.wait_for_messages(room_id, reads(one))

    running.bridge.stop()
    phone = await element.login(user_id, password, "phone")
    running.bridge.start()
    await knows_device(running, phone)
    later = unique("later")
    await mail(running, to, later)
    await phone.wait_for_messages(room_id, reads(later))


async def test_twenty_held_mails_through_a_crash(running: Env, element: ElementDevices) -> None:
    user_id, password = await running.register()
    to = f"{local(user_id)}@localhost"
    tokens = [unique(f"n{i:02d}") for i in range(20)]
    for token in tokens:
        await mail(running, to, token)
    await until(lambda: held(running, user_id) == 20, what="20 held mails")
    running.bridge.stop(signal.SIGKILL)
    running.bridge.start()

    phone = await element.login(user_id, password, "first phone")
    room_id = await phone.accept_invite()
    found = await phone.wait_for_messages(room_id, reads(*tokens), count=20, timeout=120)
    # In the order the homeserver received them (Element's own timeline order for a room
    # joined late mixes the initial sync's window with back-pagination).
    found.sort(key=lambda e: e.ts)
    order = [next(i for i, t in enumerate(tokens) if t in e.body) for e in found]
    assert order == list(range(20)), "held mail posted out of order or more than once"
    everything = await phone.messages(room_id)
    assert sum(1 for e in everything if reads(*tokens)(e)) == 20


async def test_the_welcome_decrypts_on_the_first_device(onboarding: Env,
                                                      element: ElementDevices) -> None:
    user_id, password = await onboarding.register(ONBOARDING_USERS[-2])
    config = YAML(typ="safe").load(onboarding.onboarding.config_path.read_text())
    db = bridge_db(onboarding, config)
    token = unique("welcome")
    await mail(onboarding, f"{local(user_id)}@localhost", token,
               port=onboarding.onboarding_smtp_port)
    await until(lambda: held(onboarding, user_id, db) == 1, what="the mail being held")

    phone = await element.login(user_id, password, "first phone")
    rooms = [await phone.accept_invite(), await phone.accept_invite()]
    found = {}
    for room_id in rooms:
        events = await phone.wait_for_messages(
            room_id, lambda e: e.decrypted and (token in e.body or "mailbox" in e.body))
        found[room_id] = events
    bodies = " ".join(e.body for events in found.values() for e in events)
    assert token in bodies and "Your mailbox is" in bodies


async def test_cross_signed_only_a_device_gets_keys_once_verified(strict: Env,
                                                                element: ElementDevices) -> None:
    """encryption.share_with: cross-signed — Element's "exclude insecure devices"."""
    config = YAML(typ="safe").load(strict.strict.config_path.read_text())
    db = bridge_db(strict, config)
    user_id, password = await strict.register(STRICT_USERS[0])
    to = f"{local(user_id)}@localhost"
    laptop = await element.login(user_id, password, "laptop")
    await laptop.bootstrap_cross_signing()
    one = unique("one")
    await mail(strict, to, one, port=strict.strict_smtp_port)
    room_id = await laptop.accept_invite()
    await laptop.wait_for_messages(room_id, reads(one))

    phone = await element.login(user_id, password, "phone")  # not signed by its owner
    await knows_device(strict, phone, db)
    two = unique("two")
    await mail(strict, to, two, port=strict.strict_smtp_port)
    await laptop.wait_for_messages(room_id, reads(two))
    # The phone is told the key is withheld from it (it is not verified), not just missing.
    events = await phone.wait_for_messages(
        room_id, lambda e: e.sender.startswith("@_email3_") and e.type == "m.room.message"
        and (e.decryption_failure or "").find("WITHHELD") >= 0, count=1)
    assert not any(reads(two)(e) for e in await phone.messages(room_id))
    assert events

    # Now the owner signs the phone (here by making it the one that publishes the identity),
    # and the next mail reaches it.
    await phone.bootstrap_cross_signing()
    await until(
        lambda: bool(query(
            db,
            "SELECT 1 FROM crypto_cross_signing_signatures s JOIN crypto_device d "
            "ON d.signing_key = s.signed_key WHERE d.user_id=? AND d.device_id=? "
            "AND s.signer_user_id=? AND s.signer_key != s.signed_key",
            user_id, phone.device_id, user_id)),
        what="the bridge seeing the phone's new signature",
    )
    three = unique("three")
    await mail(strict, to, three, port=strict.strict_smtp_port)
    (on_phone,) = await phone.wait_for_messages(room_id, reads(three))
    not_red(on_phone)


async def test_typing_in_the_timeline_answers_the_latest_mail(running: Env,
                                                             element: ElementDevices) -> None:
    user_id, password = await running.register()
    to = f"{local(user_id)}@localhost"
    laptop = await element.login(user_id, password, "laptop")
    token = unique("q")
    message_id = f"<{unique('mid')}@example.org>"
    await mail(running, to, token, subject="Quarterly numbers", message_id=message_id)
    room_id = await laptop.accept_invite()
    await laptop.wait_for_messages(room_id, reads(token))
    answer = unique("answer")
    await laptop.send_text(room_id, f"Looks good {answer}")
    (sent,) = await asyncio.to_thread(
        running.relay.wait_for, lambda r: answer.encode() in r.data)
    msg = message_from_bytes(sent.data, policy=default)
    assert msg["Subject"] == "Re: Quarterly numbers"
    assert msg["In-Reply-To"] == message_id
    assert message_id in msg["References"]
    assert len(running.relay.find(lambda r: answer.encode() in r.data)) == 1
