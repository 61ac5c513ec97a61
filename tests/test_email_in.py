"""Email in, end to end: real SMTP into the real bridge, read back by a real E2EE client."""

from __future__ import annotations

import asyncio
import hashlib
import smtplib
import sqlite3

import pytest
from nio import RoomEncryptionEvent, RoomMessageText
from nio.crypto.attachments import decrypt_attachment
from nio.responses import MemoryDownloadResponse

from .harness import Env, accept_invite, room_history
from .mail import make_mail, send, smtp_dialogue, unique

# A 1×1 PNG (valid IHDR: width 1, height 1).
PNG_1x1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def _msgtype(*types: str):
    return lambda e: getattr(e, "source", {}).get("content", {}).get("msgtype") in types


async def _events(client, room_id: str, predicate, count: int, timeout: float = 30) -> list:
    """Wait until the room holds `count` events matching predicate; return them, oldest first."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = [e for e in await room_history(client, room_id) if predicate(e)]
        if len(found) >= count or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.5)


def _ghost(address: str) -> str:
    return "@_email_" + address.replace("@", "=40") + ":localhost"


async def _texts(client, room_id: str, count: int, timeout: float = 60) -> list[RoomMessageText]:
    """Wait until the room holds at least `count` text messages; return them, oldest first."""
    return await _events(client, room_id, lambda e: isinstance(e, RoomMessageText), count, timeout)


async def test_plain_mail_arrives_encrypted_from_the_ghost(running: Env) -> None:
    alice = await running.new_user()
    token = unique("plain")
    await send(running.smtp_port, make_mail(to=f"{alice.user_id[1:].split(':')[0]}@localhost",
                                            subject="Lunch?", text=f"Are you free? {token}"),
               [f"{alice.user_id[1:].split(':')[0]}@localhost"])
    room_id = await accept_invite(alice)
    room = alice.rooms[room_id]
    assert room.encrypted, "the portal room is not encrypted"
    (msg,) = await _texts(alice, room_id, 1)
    assert msg.decrypted, "the mail was posted unencrypted"
    assert msg.sender == _ghost("bob@example.org")
    assert token in msg.body and "Lunch?" in msg.body
    assert room.user_name(msg.sender) == "Bob Example (bob@example.org)"
    assert room.name == "Bob Example"
    history = await room_history(alice, room_id)
    assert any(isinstance(e, RoomEncryptionEvent) for e in history)


def _local(client) -> str:
    return client.user_id[1:].split(":")[0]


async def test_html_is_sanitized(running: Env) -> None:
    alice = await running.new_user()
    html = (
        '<p onclick="steal()">Hello <b>there</b></p><script>alert("x")</script>'
        "<style>p{color:red}</style><a href=\"javascript:alert(1)\">click</a>"
        '<a href="https://example.org/ok">ok</a>'
    )
    await send(running.smtp_port, make_mail(to=f"{_local(alice)}@localhost", html=html),
               [f"{_local(alice)}@localhost"])
    room_id = await accept_invite(alice)
    (msg,) = await _texts(alice, room_id, 1)
    formatted = msg.formatted_body or ""
    assert "<b>there</b>" in formatted
    assert 'href="https://example.org/ok"' in formatted
    for bad in ("<script", "alert(", "onclick", "javascript:", "<style", "color:red"):
        assert bad not in formatted, f"{bad!r} survived sanitizing: {formatted}"


@pytest.mark.parametrize(
    ("subject_header", "charset", "expected"),
    [
        ("=?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4g8J+Mjw==?=", "utf-8", "Grüße aus Köln 🌏"),
        ("=?iso-8859-1?q?Caf=E9_cr=E8me?=", "iso-8859-1", "Café crème"),
    ],
)
async def test_charsets_and_encoded_subjects(
    running: Env, subject_header: str, charset: str, expected: str
) -> None:
    alice = await running.new_user()
    body = f"Body in {charset}: {expected}\n".encode(charset, errors="replace")
    raw = (
        f"From: Bob <bob@example.org>\r\nTo: {_local(alice)}@localhost\r\n"
        f"Subject: {subject_header}\r\nMessage-ID: <{unique()}@example.org>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + body
    await send(running.smtp_port, raw, [f"{_local(alice)}@localhost"])
    room_id = await accept_invite(alice)
    (msg,) = await _texts(alice, room_id, 1)
    if charset == "utf-8":
        assert expected in msg.body
    else:
        assert "Café crème" in msg.body
    assert f"Body in {charset}" in msg.body


async def test_attachment_is_encrypted_media_that_decrypts_to_the_original(running: Env) -> None:
    alice = await running.new_user()
    payload = bytes(range(256)) * 64
    msg = make_mail(to=f"{_local(alice)}@localhost", subject="Report")
    msg.add_attachment(payload, maintype="application", subtype="pdf", filename="../report.pdf")
    msg.add_attachment(PNG_1x1, maintype="image", subtype="png", filename="dot.png")
    await send(running.smtp_port, msg, [f"{_local(alice)}@localhost"])
    room_id = await accept_invite(alice)
    await _texts(alice, room_id, 1)
    media = await _events(alice, room_id, _msgtype("m.file", "m.image"), 2)
    assert len(media) == 2, [getattr(e, "source", e) for e in await room_history(alice, room_id)]
    by_type = {e.source["content"]["msgtype"]: e for e in media}
    pdf = by_type["m.file"].source["content"]
    assert "url" not in pdf, "an attachment was uploaded in plaintext"
    assert pdf["body"] == "report.pdf"
    assert pdf["info"]["mimetype"] == "application/pdf"
    # email.threads auto: a one-to-one conversation reads as one timeline, the attachments
    # right after their mail, not hidden in a thread.
    assert "m.relates_to" not in pdf
    file = pdf["file"]
    download = await alice.download(file["url"])
    assert isinstance(download, MemoryDownloadResponse), download
    assert download.body != payload, "the homeserver holds the plaintext"
    plain = decrypt_attachment(download.body, file["key"]["k"], file["hashes"]["sha256"],
                               file["iv"])
    assert hashlib.sha256(plain).digest() == hashlib.sha256(payload).digest()
    image = by_type["m.image"].source["content"]
    assert image["info"]["w"] == 1 and image["info"]["h"] == 1


async def test_inline_cid_image_is_posted_as_encrypted_image(running: Env) -> None:
    alice = await running.new_user()
    msg = make_mail(to=f"{_local(alice)}@localhost", subject="Look",
                    html='<p>See <img src="cid:pic1@x"></p>')
    html_part = msg.get_payload()[1]
    html_part.add_related(PNG_1x1, maintype="image", subtype="png", cid="<pic1@x>",
                          filename="pic.png")
    await send(running.smtp_port, msg, [f"{_local(alice)}@localhost"])
    room_id = await accept_invite(alice)
    images = await _events(alice, room_id, _msgtype("m.image"), 1)
    assert images, "the inline image was not posted"
    content = images[0].source["content"]
    assert "file" in content and "url" not in content


async def test_a_thread_of_three_mails_reads_as_replies_in_the_main_timeline(
    running: Env,
) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    first = make_mail(to=to, subject="Plans", text="one", message_id=f"<{unique()}@example.org>")
    await send(running.smtp_port, first, [to])
    room_id = await accept_invite(alice)
    second = make_mail(to=to, subject="Re: Plans", text="two",
                       headers={"In-Reply-To": first["Message-ID"],
                                "References": first["Message-ID"]},
                       message_id=f"<{unique()}@example.org>")
    await send(running.smtp_port, second, [to])
    third = make_mail(to=to, subject="Re: Plans", text="three",
                      headers={"In-Reply-To": second["Message-ID"],
                               "References": f"{first['Message-ID']} {second['Message-ID']}"})
    await send(running.smtp_port, third, [to])
    texts = await _texts(alice, room_id, 3)
    assert [t.body.strip().splitlines()[-1] for t in texts] == ["one", "two", "three"]
    root = texts[0]
    assert "m.relates_to" not in root.source["content"]
    assert "Plans" in root.body
    # Each later mail replies to the mail it answers (Element shows the quote), in the timeline.
    for answered, reply in zip(texts, texts[1:], strict=False):
        relation = reply.source["content"]["m.relates_to"]
        assert "rel_type" not in relation
        assert relation["m.in_reply_to"]["event_id"] == answered.event_id


async def test_group_mail_gets_a_group_room_with_two_ghosts(running: Env) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    msg = make_mail(to=f"{to}, Carol <carol@example.net>", cc="dave@example.com",
                    subject="Team")
    await send(running.smtp_port, msg, [to])
    room_id = await accept_invite(alice)
    await _texts(alice, room_id, 1)
    members = set(alice.rooms[room_id].users)
    ghosts = {_ghost("bob@example.org"), _ghost("carol@example.net"), _ghost("dave@example.com")}
    assert ghosts <= members, members
    assert alice.rooms[room_id].user_name(_ghost("carol@example.net")) == (
        "Carol (carol@example.net)"
    )
    # The other participants are part of the conversation's identity (room name, key).
    assert "Bob Example" in alice.rooms[room_id].name
    assert "Carol" in alice.rooms[room_id].name


async def test_mailing_list_goes_to_the_list_room(running: Env) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    for sender in ("Bob <bob@example.org>", "Erin <erin@example.com>"):
        msg = make_mail(to="devs@lists.example.org", sender=sender, subject=unique("topic"),
                        headers={"List-Id": "Developers <devs.lists.example.org>"})
        await send(running.smtp_port, msg, [to], mail_from="bounces@lists.example.org")
    room_id = await accept_invite(alice)
    texts = await _texts(alice, room_id, 2)
    assert {t.sender for t in texts} == {_ghost("bob@example.org"), _ghost("erin@example.com")}
    assert alice.rooms[room_id].name == "devs"


@pytest.mark.parametrize(
    ("rcpt", "code", "enhanced"),
    [
        ("nobody-{r}@localhost", 550, "5.1.1"),
        ("user@other.example", 550, "5.7.1"),
        ("{u}%other.example@localhost", 550, "5.7.1"),
        ('"{u}@other.example"@localhost', 550, "5.7.1"),
        ("@localhost:{u}@other.example", 550, "5.7.1"),
        # aiosmtpd itself refuses this one as a malformed address, before our hook runs.
        ("{u}@other.example@localhost", 553, "5.1.3"),
        ("outsider@localhost", 550, "5.7.1"),
        ("cloakroom@localhost", 550, "5.1.1"),
        ("_email_bob=40example.org@localhost", 550, "5.1.1"),
    ],
)
async def test_rcpt_rejections(running: Env, rcpt: str, code: int, enhanced: str) -> None:
    alice = await running.new_user()
    address = rcpt.format(u=_local(alice), r=unique())
    got_code, text = await asyncio.to_thread(smtp_dialogue, running.smtp_port, f"<{address}>")
    assert got_code == code, text
    assert text.startswith(enhanced), text


async def test_plus_tag_reaches_the_user_and_is_shown(running: Env) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}+shopping@localhost"
    await send(running.smtp_port, make_mail(to=to, subject="Receipt"), [to])
    room_id = await accept_invite(alice)
    (msg,) = await _texts(alice, room_id, 1)
    assert to in msg.body


async def test_too_many_recipients_and_oversize(running: Env) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"

    def dialogue() -> tuple[list[int], tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", running.smtp_port, timeout=30) as smtp:
            smtp.ehlo("test")
            size = smtp.esmtp_features["size"]
            smtp.mail("bob@example.org")
            codes = [smtp.rcpt(to)[0] for _ in range(running.max_recipients + 1)]
            smtp.rset()
            oversize = smtp.mail("bob@example.org", [f"SIZE={int(size) + 1}"])
            return codes, oversize

    codes, oversize = await asyncio.to_thread(dialogue)
    assert codes[:-1] == [250] * running.max_recipients
    assert codes[-1] == 452
    assert oversize[0] == 552 and oversize[1].startswith(b"5.3.4")


async def test_raw_message_is_gone_from_the_database_after_delivery(running: Env) -> None:
    alice = await running.new_user()
    token = unique("secret-body")
    to = f"{_local(alice)}@localhost"
    await send(running.smtp_port, make_mail(to=to, text=token), [to])
    room_id = await accept_invite(alice)
    await _texts(alice, room_id, 1)
    with sqlite3.connect(running.base_dir / "bridge.db") as conn:
        rows = conn.execute("SELECT raw FROM inbound_message").fetchall()
        assert not any(token.encode() in bytes(r[0]) for r in rows)
        (mapped,) = conn.execute(
            "SELECT COUNT(*) FROM mail_message m JOIN portal p ON p.room_id = m.room_id "
            "WHERE p.owner = ?", (alice.user_id,)
        ).fetchone()
    assert mapped == 1, "the Message-ID ↔ event map must stay"


async def test_unreadable_part_becomes_a_notice_and_the_rest_arrives(running: Env) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    raw = (
        f"From: Bob <bob@example.org>\r\nTo: {to}\r\nSubject: Broken\r\n"
        f"Message-ID: <{unique()}@example.org>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="XX"\r\n\r\n'
        "--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nthe readable part\r\n"
        "--XX\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n!!!! not base64 at all ####\r\n"
        "--XX--\r\n"
    ).encode()
    await send(running.smtp_port, raw, [to])
    room_id = await accept_invite(alice)
    (text,) = await _texts(alice, room_id, 1)
    assert "the readable part" in text.body
    notices = await _events(alice, room_id, _msgtype("m.notice"), 1)
    assert notices, "no notice about the unreadable part"
    content = notices[0].source["content"]
    assert content["body"].startswith("⚠")
    # A one-to-one conversation is not threaded: the note replies to the mail it is about.
    assert content["m.relates_to"]["m.in_reply_to"]["event_id"] == text.event_id
