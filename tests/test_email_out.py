"""Email out, end to end: nio writes in Element's place, the test relay receives real SMTP."""

from __future__ import annotations

import asyncio
import hashlib
import io
import secrets
import signal
import sqlite3
import time
from email.utils import parseaddr
from typing import Any

from nio import AsyncClient, RoomMessageText, UploadResponse

from .harness import Env, accept_invite, open_dm_with_bot, room_history, send_text, wait_for_event
from .mail import make_mail, send, unique
from .relay import Received
from .test_email_in import PNG_1x1


def _local(client: AsyncClient) -> str:
    return client.user_id[1:].split(":")[0]


async def _portal(env: Env, client: AsyncClient, correspondent: str = "bob@example.org",
                  subject: str = "Plans") -> tuple[str, RoomMessageText, str]:
    """A portal with one mail from the correspondent: (room, its root event, its Message-ID)."""
    to = f"{_local(client)}@localhost"
    message_id = f"{unique('in')}@example.org"
    await send(env.smtp_port, make_mail(to=to, sender=f"Bob <{correspondent}>", subject=subject,
                                        message_id=f"<{message_id}>"), [to],
               mail_from=correspondent)
    room_id = await accept_invite(client)
    root = await wait_for_event(client, room_id, lambda e: isinstance(e, RoomMessageText))
    return room_id, root, message_id


async def _say(client: AsyncClient, room_id: str, body: str, thread: str | None = None,
               extra: dict[str, Any] | None = None) -> str:
    content: dict[str, Any] = {"msgtype": "m.text", "body": body, **(extra or {})}
    if thread:
        content["m.relates_to"] = {"rel_type": "m.thread", "event_id": thread,
                                   "is_falling_back": True,
                                   "m.in_reply_to": {"event_id": thread}}
    resp = await client.room_send(room_id, "m.room.message", content,
                                  ignore_unverified_devices=True)
    return resp.event_id


def _containing(token: str):
    return lambda r: token.encode() in r.data


async def _relay_wait(env: Env, predicate, count: int = 1, timeout: float = 60) -> list[Received]:
    return await asyncio.to_thread(env.relay.wait_for, predicate, count, timeout)


def _notice_about(event_id: str, text: str):
    def predicate(e) -> bool:
        content = getattr(e, "source", {}).get("content", {})
        relates = content.get("m.relates_to", {})
        return (content.get("msgtype") == "m.notice" and text in content.get("body", "")
                and relates.get("m.in_reply_to", {}).get("event_id") == event_id)
    return predicate


async def test_thread_reply_is_mailed_with_threading_and_the_answer_comes_back(
    running: Env,
) -> None:
    alice = await running.new_user()
    room_id, root, bob_mid = await _portal(running, alice)
    token = unique("reply")
    mine = await _say(alice, room_id, f"Sounds good {token}", thread=root.event_id,
                      extra={"format": "org.matrix.custom.html",
                             "formatted_body": f"Sounds <b>good</b> {token}"})
    (mail,) = await _relay_wait(running, _containing(token))
    msg = mail.message
    assert parseaddr(msg["From"])[1] == f"{_local(alice)}@localhost"
    assert [parseaddr(a)[1] for a in msg.get_all("To")] == ["bob@example.org"]
    assert mail.rcpt_tos == ["bob@example.org"]
    assert msg["Subject"] == "Re: Plans"
    assert msg["In-Reply-To"] == f"<{bob_mid}>"
    assert f"<{bob_mid}>" in msg["References"]
    our_mid = msg["Message-ID"]
    assert our_mid.endswith("@localhost>")
    types = [part.get_content_type() for part in msg.walk()]
    assert "text/plain" in types and "text/html" in types
    assert "<b>good</b>" in msg.get_body(("html",)).get_content()
    # Bob answers our mail: in this one-to-one conversation it comes as a reply to what we wrote.
    to = f"{_local(alice)}@localhost"
    answer = unique("answer")
    await send(running.smtp_port, make_mail(to=to, subject="Re: Plans", text=answer,
                                            headers={"In-Reply-To": our_mid,
                                                     "References": f"<{bob_mid}> {our_mid}"}),
               [to])
    reply = await wait_for_event(alice, room_id, lambda e: answer in getattr(e, "body", ""))
    relates = reply.source["content"]["m.relates_to"]
    assert "rel_type" not in relates and relates["m.in_reply_to"]["event_id"] == mine


async def test_encrypted_image_is_attached_byte_for_byte(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, _ = await _portal(running, alice)
    data = PNG_1x1 + secrets.token_bytes(2048)
    upload, keys = await alice.upload(io.BytesIO(data), content_type="image/png",
                                      filename="photo.png", encrypt=True, filesize=len(data))
    assert isinstance(upload, UploadResponse), upload
    name = f"{unique('photo')}.png"
    content = {
        "msgtype": "m.image", "body": name, "filename": name,
        "info": {"mimetype": "image/png", "size": len(data)},
        "file": {"url": upload.content_uri, **keys},
        "m.relates_to": {"rel_type": "m.thread", "event_id": root.event_id,
                         "is_falling_back": True, "m.in_reply_to": {"event_id": root.event_id}},
    }
    await alice.room_send(room_id, "m.room.message", content, ignore_unverified_devices=True)
    (mail,) = await _relay_wait(running, _containing(name))
    attachments = list(mail.message.iter_attachments())
    assert [a.get_filename() for a in attachments] == [name]
    assert attachments[0].get_content_type() == "image/png"
    payload = attachments[0].get_content()
    assert hashlib.sha256(payload).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_temporary_failures_are_retried_and_sent_once(running: Env) -> None:
    alice = await running.new_user()
    correspondent = f"{unique('busy')}@example.org"
    room_id, root, _ = await _portal(running, alice, correspondent)
    running.relay.script(correspondent, "451 4.3.0 busy", "451 4.3.0 still busy")
    token = unique("retry")
    await _say(alice, room_id, token, thread=root.event_id)
    (mail,) = await _relay_wait(running, _containing(token))
    assert mail.rcpt_tos == [correspondent]
    sentinel = unique("sentinel")
    await _say(alice, room_id, sentinel, thread=root.event_id)
    await _relay_wait(running, _containing(sentinel))
    assert len(running.relay.find(_containing(token))) == 1


async def test_permanent_failure_becomes_a_notice_replying_to_the_message(running: Env) -> None:
    alice = await running.new_user()
    correspondent = f"{unique('gone')}@example.org"
    room_id, root, _ = await _portal(running, alice, correspondent)
    running.relay.script(correspondent, "550 5.1.1 user unknown")
    event_id = await _say(alice, room_id, unique("doomed"), thread=root.event_id)
    notice = await wait_for_event(alice, room_id, _notice_about(event_id, "550 5.1.1"))
    assert "not delivered" in notice.source["content"]["body"]
    # One-to-one: a reply in the main timeline, not hidden in a thread.
    assert "rel_type" not in notice.source["content"]["m.relates_to"]


async def test_bridge_killed_with_a_full_outbox_sends_exactly_once(running: Env) -> None:
    alice = await running.new_user()
    correspondent = f"{unique('later')}@example.org"
    room_id, root, _ = await _portal(running, alice, correspondent)
    running.relay.script(correspondent, *["451 4.3.0 not now"] * 50)
    token = unique("outbox")
    event_id = await _say(alice, room_id, token, thread=root.event_id)
    db = running.base_dir / "bridge.db"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with sqlite3.connect(db) as conn:
            row = conn.execute(
                "SELECT attempts FROM outbox WHERE event_id=?", (event_id,)
            ).fetchone()
        if row and row[0] >= 1:
            break
        await asyncio.sleep(0.2)
    assert row and row[0] >= 1, "the message never reached the outbox"
    running.bridge.stop(signal.SIGKILL)
    running.relay.scripts[correspondent].clear()
    running.bridge.start()
    await _relay_wait(running, _containing(token))
    sentinel = unique("sentinel")
    await _say(alice, room_id, sentinel, thread=root.event_id)
    await _relay_wait(running, _containing(sentinel))
    assert len(running.relay.find(_containing(token))) == 1


async def test_no_header_injection_through_names_subjects_or_filenames(running: Env) -> None:
    alice = await running.new_user()
    await alice.set_displayname("Alice\r\nBcc: evil@attacker.example")
    room_id, root, _ = await _portal(running, alice, subject="Hi Bcc: evil@attacker.example")
    evil_name = "notes.txt\r\nBcc: evil@attacker.example"
    upload, keys = await alice.upload(io.BytesIO(b"hello"), content_type="text/plain",
                                      filename="notes.txt", encrypt=True, filesize=5)
    token = unique("inject")
    await _say(alice, room_id, f"{token}\r\nBcc: evil@attacker.example", thread=root.event_id)
    await alice.room_send(room_id, "m.room.message", {
        "msgtype": "m.file", "body": evil_name, "filename": evil_name,
        "info": {"mimetype": "text/plain", "size": 5}, "file": {"url": upload.content_uri, **keys},
    }, ignore_unverified_devices=True)
    received = await _relay_wait(running, lambda r: r.mail_from.startswith(_local(alice)), 2)
    assert len(received) == 2
    for mail in received:
        assert all("evil" not in rcpt for rcpt in mail.rcpt_tos)
        msg = mail.message
        assert msg.get_all("Bcc") is None
        header_block = mail.data.split(b"\r\n\r\n", 1)[0]
        assert not any(line.lower().startswith(b"bcc") for line in header_block.split(b"\r\n"))


async def test_non_owner_gets_one_notice_and_is_not_mailed(running: Env) -> None:
    alice = await running.new_user()
    carol = await running.new_user()
    room_id, root, _ = await _portal(running, alice)
    await alice.room_invite(room_id, carol.user_id)
    await accept_invite(carol)
    # Make sure carol's client knows every member's devices (the bot's included) before it
    # shares its first Megolm session; otherwise the bridge can't read her message at all.
    await carol.joined_members(room_id)
    await carol.sync(timeout=0)
    if carol.should_query_keys:
        await carol.keys_query()
    carols = [unique("carol"), unique("carol-again")]
    first = await send_text(carol, room_id, carols[0])
    await send_text(carol, room_id, carols[1])
    # Ordering trick: the owner's edit is handled after carol's messages; its notice is last.
    mine = await _say(alice, room_id, unique("mine"), thread=root.event_id)
    edit = await _say(alice, room_id, "* edited", extra={
        "m.new_content": {"msgtype": "m.text", "body": "edited"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": mine}})
    await wait_for_event(alice, room_id, _notice_about(edit, "can't be edited"))
    notices = [e for e in await room_history(alice, room_id)
               if "Only" in getattr(e, "body", "") and "sends mail" in getattr(e, "body", "")]
    assert len(notices) == 1
    assert notices[0].source["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == first
    assert not running.relay.find(lambda r: any(c.encode() in r.data for c in carols))


async def test_rate_limit_stops_and_later_resumes_sending(running: Env) -> None:
    from .stack import OUTBOUND_LIMIT, OUTBOUND_WINDOW

    alice = await running.new_user()
    room_id, root, _ = await _portal(running, alice)
    tag = unique("rate")
    for n in range(OUTBOUND_LIMIT):
        await _say(alice, room_id, f"{tag} {n}", thread=root.event_id)
    over = await _say(alice, room_id, f"{tag} over", thread=root.event_id)
    notice = await wait_for_event(alice, room_id, _notice_about(over, "Sending resumes at"))
    assert "limit is" in notice.source["content"]["body"]
    await _relay_wait(running, _containing(tag), OUTBOUND_LIMIT)
    await asyncio.sleep(OUTBOUND_WINDOW + 1)
    await _say(alice, room_id, f"{tag} later", thread=root.event_id)
    await _relay_wait(running, _containing(f"{tag} later"))
    assert not running.relay.find(_containing(f"{tag} over"))


async def test_new_command_and_ghost_invite_start_conversations(running: Env) -> None:
    alice = await running.new_user()
    dm = await open_dm_with_bot(alice, running.bot_mxid)
    await send_text(alice, dm, "new not-an-address Hello")
    await wait_for_event(alice, dm, lambda e: "not a valid email address" in getattr(e, "body", ""))
    subject = unique("Kickoff")
    await send_text(alice, dm, f"new dave@example.net {subject}")
    room_id = await accept_invite(alice)
    assert alice.rooms[room_id].encrypted
    token = unique("new")
    await send_text(alice, room_id, token)
    (mail,) = await _relay_wait(running, _containing(token))
    assert mail.rcpt_tos == ["dave@example.net"] and mail.message["Subject"] == subject
    # Inviting a ghost into a DM makes that room the portal.
    ghost = "@_email_erin=40example.com:localhost"
    ghost_room = await open_dm_with_bot(alice, ghost)
    await wait_for_event(alice, ghost_room, lambda e: "now emails" in getattr(e, "body", ""))
    token = unique("ghost")
    await send_text(alice, ghost_room, token)
    (mail,) = await _relay_wait(running, _containing(token))
    assert mail.rcpt_tos == ["erin@example.com"]


async def test_bounce_for_a_sent_message_becomes_a_notice_in_its_thread(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, _ = await _portal(running, alice)
    token = unique("bounced")
    event_id = await _say(alice, room_id, token, thread=root.event_id)
    (mail,) = await _relay_wait(running, _containing(token))
    our_mid = mail.message["Message-ID"]
    to = f"{_local(alice)}@localhost"
    dsn = (
        f"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\nTo: {to}\r\n"
        f"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <{unique()}@mx>\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nYour message could not be delivered.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.org\r\n\r\n"
        "Final-Recipient: rfc822; bob@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"Message-ID: {our_mid}\r\nSubject: Re: Plans\r\n\r\n--B--\r\n"
    ).encode()
    await send(running.smtp_port, dsn, [to], mail_from="")
    notice = await wait_for_event(alice, room_id, _notice_about(event_id, "bob@example.org"))
    assert "550 5.1.1" in notice.source["content"]["body"]
    assert "rel_type" not in notice.source["content"]["m.relates_to"]


# The main timeline, who mails, who receives, whose name (issues 8, 9 and 13) ---------------------


async def _mail_in_thread(env: Env, client: AsyncClient, subject: str, parent_mid: str,
                          headers: dict[str, str] | None = None,
                          cc: str | None = None) -> tuple[str, str]:
    """Bob writes again, answering parent_mid: (its Message-ID, a token in its text)."""
    to = f"{_local(client)}@localhost"
    message_id = f"{unique('again')}@example.org"
    token = unique("again")
    await send(env.smtp_port, make_mail(
        to=to, sender="Bob <bob@example.org>", subject=subject, text=token, cc=cc,
        message_id=f"<{message_id}>",
        headers={"In-Reply-To": f"<{parent_mid}>", "References": f"<{parent_mid}>",
                 **(headers or {})}), [to], mail_from="bob@example.org")
    return message_id, token


async def test_main_timeline_message_continues_the_conversation(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, bob_mid = await _portal(running, alice, subject="Plans")
    token = unique("main")
    typed = await send_text(alice, room_id, f"Works for me {token}")  # no thread, no reply
    (mail,) = await _relay_wait(running, _containing(token))
    msg = mail.message
    assert msg["Subject"] == "Re: Plans"
    assert msg["In-Reply-To"] == f"<{bob_mid}>"
    assert msg["References"].split() == [f"<{bob_mid}>"]
    assert mail.rcpt_tos == ["bob@example.org"]
    our_mid = msg["Message-ID"]
    # Bob answers it: the answer replies to the message alice typed.
    answer_mid, answer = await _mail_in_thread(running, alice, "Re: Plans", our_mid.strip("<>"),
                                               headers={"References": f"<{bob_mid}> {our_mid}"})
    reply = await wait_for_event(alice, room_id, lambda e: answer in getattr(e, "body", ""))
    assert reply.source["content"]["m.relates_to"]["m.in_reply_to"]["event_id"] == typed
    # The next message in the main timeline answers Bob's answer, the latest mail of the room.
    token = unique("main-again")
    await send_text(alice, room_id, token)
    (mail,) = await _relay_wait(running, _containing(token))
    assert mail.message["In-Reply-To"] == f"<{answer_mid}>"
    assert mail.message["References"].split() == [f"<{bob_mid}>", our_mid, f"<{answer_mid}>"]
    assert mail.message["Subject"] == "Re: Plans"


async def test_a_user_whose_id_has_a_plus_may_not_send(running: Env) -> None:
    # @x+tag would send as x+tag@, an address that delivers to @x.
    plus = await running.new_user(f"{unique('plus').replace('-', '')}+tag")
    dm = await open_dm_with_bot(plus, running.bot_mxid)
    await send_text(plus, dm, f"new dave@example.net {unique('Hello')}")
    room_id = await accept_invite(plus)
    event_id = await send_text(plus, room_id, unique("as-someone-else"))
    notice = await wait_for_event(plus, room_id, _notice_about(event_id, "no email address"))
    assert "“+”" in notice.source["content"]["body"]
    assert not running.relay.find(lambda r: _local(plus).split("+")[0].encode() in r.data)


async def test_a_reply_to_hundreds_of_reply_to_addresses_is_not_sent(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, bob_mid = await _portal(running, alice)
    crowd = ", ".join(f"p{n}@crowd.example" for n in range(60))
    _, token = await _mail_in_thread(running, alice, "Re: Plans", bob_mid,
                                     headers={"Reply-To": crowd})
    await wait_for_event(alice, room_id, lambda e: token in getattr(e, "body", ""))
    event_id = await _say(alice, room_id, unique("to-all"), thread=root.event_id)
    notice = await wait_for_event(alice, room_id, _notice_about(event_id, "61 addresses"))
    assert "more than the 50" in notice.source["content"]["body"]
    assert not running.relay.find(lambda r: any("crowd.example" in a for a in r.rcpt_tos))


async def test_a_reply_to_someone_not_in_the_room_says_so_once(running: Env) -> None:
    alice = await running.new_user()
    room_id, root, bob_mid = await _portal(running, alice)
    carol = f"{unique('carol')}@example.net"
    _, token = await _mail_in_thread(running, alice, "Re: Plans", bob_mid, cc=carol)
    await wait_for_event(alice, room_id, lambda e: token in getattr(e, "body", ""))
    first = await _say(alice, room_id, unique("one"), thread=root.event_id)
    notice = await wait_for_event(alice, room_id, _notice_about(first, "This goes to"))
    body = notice.source["content"]["body"]
    assert f"This goes to: bob@example.org, {carol}." in body
    assert f"Not in this room: {carol}" in body
    (mail,) = await _relay_wait(running, lambda r: carol in r.rcpt_tos)
    assert sorted(mail.rcpt_tos) == sorted(["bob@example.org", carol])
    await _say(alice, room_id, unique("two"), thread=root.event_id)
    # Ordering trick: the edit's notice comes after whatever the second message caused.
    edit = await _say(alice, room_id, "* edited", extra={
        "m.new_content": {"msgtype": "m.text", "body": "edited"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": first}})
    await wait_for_event(alice, room_id, _notice_about(edit, "can't be edited"))
    notices = [e for e in await room_history(alice, room_id)
               if "This goes to" in getattr(e, "body", "")]
    assert len(notices) == 1


async def test_from_is_the_global_display_name_and_follows_a_rename(running: Env) -> None:
    alice = await running.new_user()
    await alice.set_displayname("Alice Global")
    room_id, root, _ = await _portal(running, alice)
    # A nickname for this room only: mail goes out under the name of the profile.
    await alice.room_put_state(room_id, "m.room.member",
                               {"membership": "join", "displayname": "Room Nick"},
                               state_key=alice.user_id)
    token = unique("named")
    await _say(alice, room_id, token, thread=root.event_id)
    (mail,) = await _relay_wait(running, _containing(token))
    assert parseaddr(mail.message["From"]) == ("Alice Global", f"{_local(alice)}@localhost")
    await alice.set_displayname("Alice Renamed")
    token = unique("renamed")
    await _say(alice, room_id, token, thread=root.event_id)
    (mail,) = await _relay_wait(running, _containing(token))
    assert parseaddr(mail.message["From"])[0] == "Alice Renamed"


async def test_queued_mail_is_sealed_in_the_bridge_database(running: Env) -> None:
    alice = await running.new_user()
    correspondent = f"{unique('sealed')}@example.org"
    room_id, root, _ = await _portal(running, alice, correspondent)
    running.relay.script(correspondent, *["451 4.3.0 not now"] * 50)
    token = unique("sealed")
    event_id = await _say(alice, room_id, token, thread=root.event_id)
    db = running.base_dir / "bridge.db"
    deadline = time.monotonic() + 30
    raw = None
    while time.monotonic() < deadline and raw is None:
        with sqlite3.connect(db) as conn:
            row = conn.execute("SELECT raw FROM outbox WHERE event_id=?", (event_id,)).fetchone()
        raw = bytes(row[0]) if row and row[0] else None
        if raw is None:
            await asyncio.sleep(0.2)
    running.relay.scripts[correspondent].clear()
    assert raw is not None, "the message never reached the outbox"
    assert token.encode() not in raw and raw.startswith(b"\x00CRS1")
