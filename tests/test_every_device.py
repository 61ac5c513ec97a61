"""Every device of the reader can read every message (matrix-nio as the reader's client).

Played in the order things really happen: mail before the user's first login, a second device
appearing later, a restart in between. The Element-stack versions are in
tests/test_every_device_element.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from nio import AsyncClient, MegolmEvent, RoomMessageText
from nio.crypto.attachments import decrypt_attachment
from nio.responses import MemoryDownloadResponse

from .harness import Env, accept_invite, room_history
from .mail import make_mail, send, unique

PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def local(user_id: str) -> str:
    return user_id[1:].split(":")[0]


def bridge_db(env: Env, config: dict | None = None) -> Path:
    return Path((config or env.config)["database"].removeprefix("sqlite:"))


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    """Read the bridge's database while it runs (an ordinary WAL reader: read-only URI
    connections have been seen reading a torn page while the bridge truncates its WAL)."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def until(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.2)


def held(env: Env, user_id: str, db: Path | None = None) -> int:
    rows = query(db or bridge_db(env),
                 "SELECT COUNT(*) FROM inbound_delivery WHERE user_id=? AND state='held'", user_id)
    return rows[0][0]


async def bridge_knows_device(env: Env, client: AsyncClient, db: Path | None = None) -> None:
    """The bridge has heard (from a transaction) that this user's devices changed: it stored
    the new device, or it dropped the Megolm sessions of the rooms it shares with them (the
    change can reach it before the device's keys do; the next session then asks again).

    Not a sleep: the device list change reaches the bridge asynchronously, and a mail sent
    before that is, correctly, encrypted for the devices known then.
    """
    await until(lambda: device_change_seen(db or bridge_db(env), client.user_id,
                                           client.device_id),
                what=f"the bridge hearing of device {client.device_id}")


def device_change_seen(db: Path, user_id: str, device_id: str) -> bool:
    if query(db, "SELECT 1 FROM crypto_device WHERE user_id=? AND device_id=?",
             user_id, device_id):
        return True
    # Every room of theirs that had a session has none any more: the rotation happened.
    return not query(
        db, "SELECT 1 FROM crypto_megolm_outbound_session WHERE room_id IN "
        "(SELECT room_id FROM mx_user_profile WHERE user_id=?)", user_id)


async def texts(client: AsyncClient, room_id: str, count: int, timeout: float = 60
                ) -> list[RoomMessageText | MegolmEvent]:
    """The room's mail texts (decrypted, or still Megolm events), once `count` have come."""
    def is_text(e: object) -> bool:
        return isinstance(e, RoomMessageText) or (
            isinstance(e, MegolmEvent) and e.sender.startswith("@_email")
        )

    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in await room_history(client, room_id) if is_text(e)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.5)


async def mail(env: Env, to: str, token: str, sender: str = "Bob Example <bob@example.org>",
               port: int | None = None, attachment: bytes | None = None, **kwargs: str) -> None:
    msg = make_mail(to=to, sender=sender, subject=kwargs.pop("subject", "Hello"),
                    text=f"Mail {token}", **kwargs)
    if attachment:
        msg.add_attachment(attachment, maintype="image", subtype="png", filename="dot.png")
    address = sender.rpartition("<")[2].rstrip(">")
    result = await send(port or env.smtp_port, msg, [to], mail_from=address)
    assert result == {}, result  # 250 for the recipient


def assert_reads(events: list, *tokens: str) -> None:
    undecrypted = [e for e in events if isinstance(e, MegolmEvent)]
    assert not undecrypted, f"{len(undecrypted)} message(s) this device cannot decrypt"
    bodies = [e.body for e in events]
    for token in tokens:
        assert sum(token in b for b in bodies) == 1, (token, bodies)


async def test_mail_before_the_first_login_is_held_and_then_read(running: Env) -> None:
    user_id, _ = await running.register()
    first, second = unique("before"), unique("after")
    await mail(running, f"{local(user_id)}@localhost", first, attachment=PNG_1x1)
    # Nothing can decrypt yet, so nothing is posted: the mail waits in the queue.
    await until(lambda: held(running, user_id) == 1, what="the mail being held")

    phone = await running.login(user_id, "first phone")
    room_id = await accept_invite(phone)
    (text,) = await texts(phone, room_id, 1)
    assert_reads([text], first)
    media = [e for e in await room_history(phone, room_id)
             if getattr(e, "source", {}).get("content", {}).get("msgtype") == "m.image"]
    assert len(media) == 1
    file = media[0].source["content"]["file"]
    download = await phone.download(file["url"])
    assert isinstance(download, MemoryDownloadResponse), download
    plain = decrypt_attachment(download.body, file["key"]["k"], file["hashes"]["sha256"],
                               file["iv"])
    assert hashlib.sha256(plain).digest() == hashlib.sha256(PNG_1x1).digest()
    assert held(running, user_id) == 0

    await mail(running, f"{local(user_id)}@localhost", second)
    assert_reads(await texts(phone, room_id, 2), first, second)


async def test_a_new_device_reads_mail_that_comes_after_it(running: Env) -> None:
    laptop = await running.new_user()
    to = f"{local(laptop.user_id)}@localhost"
    one, two = unique("one"), unique("two")
    await mail(running, to, one)
    room_id = await accept_invite(laptop)
    assert_reads(await texts(laptop, room_id, 1), one)

    phone = await running.login(laptop.user_id, "new phone")  # no backup, not verified
    await bridge_knows_device(running, phone)
    await mail(running, to, two)
    found = await texts(phone, room_id, 2)
    # The first mail came before the phone existed: reading that is the key backup's job.
    assert_reads(found[-1:], two)
    assert_reads(await texts(laptop, room_id, 2), one, two)


async def test_both_ghosts_of_a_group_reach_a_new_device(running: Env) -> None:
    laptop = await running.new_user()
    to = f"{local(laptop.user_id)}@localhost"
    bob, carol = "Bob <bob@example.org>", "Carol <carol@example.net>"
    await mail(running, to, unique("start"), sender=bob, cc="carol@example.net")
    room_id = await accept_invite(laptop)
    await texts(laptop, room_id, 1)

    phone = await running.login(laptop.user_id, "new phone")
    await bridge_knows_device(running, phone)
    from_bob, from_carol = unique("bob"), unique("carol")
    await mail(running, to, from_bob, sender=bob, cc="carol@example.net")
    await mail(running, to, from_carol, sender=carol, cc="bob@example.org")
    found = await texts(phone, room_id, 3)
    assert_reads(found[-2:], from_bob, from_carol)
    assert {e.sender for e in found[-2:]} == {
        "@_email_bob=40example.org:localhost", "@_email_carol=40example.net:localhost"}


async def test_a_device_that_appeared_while_the_bridge_was_down(running: Env) -> None:
    laptop = await running.new_user()
    to = f"{local(laptop.user_id)}@localhost"
    await mail(running, to, unique("one"))
    room_id = await accept_invite(laptop)
    await texts(laptop, room_id, 1)

    running.bridge.stop()
    phone = await running.login(laptop.user_id, "new phone")
    running.bridge.start()
    # The ghost's identity is not loaded after the restart; Synapse tells the bridge about
    # the device it missed.
    await bridge_knows_device(running, phone)
    later = unique("later")
    await mail(running, to, later)
    found = await texts(phone, room_id, 2)
    assert_reads(found[-1:], later)


async def test_twenty_held_mails_survive_a_crash_and_arrive_once_in_order(running: Env) -> None:
    user_id, _ = await running.register()
    to = f"{local(user_id)}@localhost"
    tokens = [unique(f"n{i:02d}") for i in range(20)]
    for token in tokens:
        await mail(running, to, token)
    await until(lambda: held(running, user_id) == 20, what="20 held mails")
    running.bridge.stop(signal.SIGKILL)
    running.bridge.start()

    phone = await running.login(user_id, "first phone")
    room_id = await accept_invite(phone)
    found = await texts(phone, room_id, 20, timeout=120)
    assert_reads(found, *tokens)
    bodies = [e.body for e in found]
    order = [next(i for i, t in enumerate(tokens) if t in b) for b in bodies]
    assert order == sorted(order), "held mail was posted out of order"
    assert held(running, user_id) == 0


async def test_the_welcome_waits_for_the_first_device(onboarding: Env) -> None:
    from .stack import ONBOARDING_USERS

    user_id, _ = await onboarding.register(ONBOARDING_USERS[-1])
    token = unique("welcome")
    config_path = onboarding.onboarding.config_path
    from ruamel.yaml import YAML

    db = bridge_db(onboarding, YAML(typ="safe").load(config_path.read_text()))
    await mail(onboarding, f"{local(user_id)}@localhost", token,
               port=onboarding.onboarding_smtp_port)
    await until(lambda: held(onboarding, user_id, db) == 1, what="the mail being held")
    # No welcome DM yet: it would be encrypted to nobody.
    assert not query(db, "SELECT 1 FROM local_user WHERE user_id=? AND welcomed_at IS NOT NULL",
                     user_id)

    phone = await onboarding.login(user_id, "first phone")
    await accept_invite(phone)  # the conversation, invited at once
    await accept_invite(phone)  # the welcome DM, once a device could read it

    async def everything() -> list:
        events = []
        for room_id in list(phone.rooms):
            events += [e for e in await room_history(phone, room_id)
                       if isinstance(e, MegolmEvent) or hasattr(e, "body")]
        return events

    deadline = time.monotonic() + 60
    while True:
        events = await everything()
        bodies = " ".join(getattr(e, "body", "") for e in events)
        if (token in bodies and "mailbox" in bodies) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert not [e for e in events if isinstance(e, MegolmEvent)], "undecryptable messages"
    assert token in bodies, bodies
    assert "mailbox" in bodies, bodies  # the welcome names their mailbox address
