"""The hub against hostile mail: strangers can't join threads, text never pings, big mails stay
readable. Real SMTP into the real bridge, read back by a real E2EE client (matrix-nio)."""

from __future__ import annotations

from nio import RoomMessageText

from .harness import Env, accept_invite
from .mail import make_mail, send, unique
from .test_every_device import local, texts


async def test_a_stranger_quoting_a_message_id_does_not_join_the_thread(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    bobs_id = f"<{unique('bob')}@example.org>"
    await send(running.smtp_port, make_mail(to=to, subject="Wire transfer", text="From Bob",
                                            message_id=bobs_id), [to])
    bobs_room = await accept_invite(alice)
    await texts(alice, bobs_room, 1)
    # Eve read Bob's Message-ID somewhere (a list, a Cc) and "replies" to it.
    token = unique("eve")
    eve = make_mail(to=to, sender="Eve <eve@evil.example>", subject="Re: Wire transfer",
                    text=f"please wire the money {token}",
                    headers={"In-Reply-To": bobs_id, "References": bobs_id})
    await send(running.smtp_port, eve, [to], mail_from="eve@evil.example")
    eves_room = await accept_invite(alice)
    assert eves_room != bobs_room, "a stranger's mail was posted into Bob's room"
    (msg,) = await texts(alice, eves_room, 1)
    assert token in msg.body and msg.sender == "@_email_eve=40evil.example:localhost"
    assert not [e for e in await texts(alice, bobs_room, 1) if token in getattr(e, "body", "")]


async def test_a_participant_s_reply_still_threads(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    first = f"<{unique('first')}@example.org>"
    await send(running.smtp_port, make_mail(to=to, subject="Plans", text="one",
                                            message_id=first), [to])
    room_id = await accept_invite(alice)
    token = unique("reply")
    await send(running.smtp_port, make_mail(to=to, subject="Re: Plans", text=token,
                                            headers={"In-Reply-To": first}), [to])
    found = await texts(alice, room_id, 2)
    assert token in found[-1].body


async def test_bridged_text_mentions_nobody(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    await send(running.smtp_port, make_mail(
        to=to, text=f"@room look at this, {alice.user_id} and Alice"), [to])
    room_id = await accept_invite(alice)
    (msg,) = await texts(alice, room_id, 1)
    assert isinstance(msg, RoomMessageText)
    assert msg.source["content"]["m.mentions"] == {}, msg.source["content"]


async def test_reply_to_elsewhere_is_shown(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    await send(running.smtp_port, make_mail(
        to=to, text="hi", headers={"Reply-To": "collector@elsewhere.example"}), [to])
    room_id = await accept_invite(alice)
    (msg,) = await texts(alice, room_id, 1)
    assert "replies go to collector@elsewhere.example" in msg.body


async def test_a_mail_to_many_seats_a_few_and_names_the_rest(running: Env) -> None:
    from bridge.portal.portal import MAX_SEATED

    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    others = [f"p{i:03d}@crowd.example" for i in range(MAX_SEATED + 15)]
    token = unique("crowd")
    await send(running.smtp_port, make_mail(to=to, text=token, cc=", ".join(others)), [to])
    room_id = await accept_invite(alice)
    (msg,) = await texts(alice, room_id, 1)
    assert token in msg.body
    assert "Also on this mail:" in msg.body and "and 5 others" in msg.body
    members = await alice.joined_members(room_id)
    ghosts = [m for m in members.members if m.user_id.startswith("@_email_")]
    assert len(ghosts) <= MAX_SEATED + 1  # the author and at most MAX_SEATED others


async def test_bot_commands_are_bounded(running: Env) -> None:
    from .harness import open_dm_with_bot, send_text, sync_until

    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    crowd = ", ".join(f"p{i}@crowd.example" for i in range(21))
    await send_text(alice, room_id, f"new {crowd} Too many")
    await sync_until(alice, lambda rid, e: rid == room_id and e.sender == running.bot_mxid
                     and "At most 20 addresses" in getattr(e, "body", ""))
    await send_text(alice, room_id, "status " + "x" * 5000)
    await sync_until(alice, lambda rid, e: rid == room_id and e.sender == running.bot_mxid
                     and "too long for a command" in getattr(e, "body", ""))
    assert not [r for r in alice.rooms if r != room_id and "crowd" in str(alice.rooms[r].name)]


async def test_a_mail_to_two_thousand_people_is_delivered(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    crowd = [f"person{i:04d}@crowd{i % 7}.example" for i in range(2000)]
    token = unique("thousands")
    msg = make_mail(to=", ".join([to, *crowd[:1000]]), cc=", ".join(crowd[1000:]), text=token)
    await send(running.smtp_port, msg, [to])
    room_id = await accept_invite(alice, timeout=120)
    (text,) = await texts(alice, room_id, 1, timeout=120)
    assert token in text.body
    assert "others" in text.body  # the people not seated are named, not invited
