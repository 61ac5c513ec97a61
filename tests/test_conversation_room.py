"""The user owns their conversation room (issue 13, first parts): full power in it, and leaving
it archives the conversation, so the next mail comes in a fresh room instead of a room nobody
reads. Real SMTP into the real bridge, nio as the reader."""

from __future__ import annotations

import asyncio

from .harness import Env, accept_invite
from .mail import make_mail, send, unique
from .test_every_device import local, texts


async def test_the_owner_has_full_power_in_their_conversation(running: Env) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    await send(running.smtp_port, make_mail(to=to, text=unique("power")), [to])
    room_id = await accept_invite(alice)
    levels = await asyncio.to_thread(
        running.synapse.request, "GET",
        f"/_matrix/client/v3/rooms/{room_id}/state/m.room.power_levels", None,
        alice.access_token,
    )
    assert levels["users"][alice.user_id] == 100


async def test_leaving_archives_the_conversation_and_new_mail_gets_a_fresh_room(
    running: Env,
) -> None:
    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    first = unique("first")
    await send(running.smtp_port, make_mail(to=to, text=first, subject="Old"), [to])
    old_room = await accept_invite(alice)
    await texts(alice, old_room, 1)
    await alice.room_leave(old_room)
    second = unique("second")
    await send(running.smtp_port, make_mail(to=to, text=second, subject="Re: Old"), [to])
    new_room = await accept_invite(alice)
    assert new_room != old_room
    (msg,) = await texts(alice, new_room, 1)
    assert second in msg.body


async def _two_mails(env: Env, alice, sender: str, first_raw=None, second_raw=None):
    to = f"{local(alice.user_id)}@localhost"
    address = sender.rpartition("<")[2].rstrip(">")
    one, two = unique("one"), unique("two")
    await send(env.smtp_port, first_raw(to, one) if first_raw else make_mail(
        to=to, sender=sender, text=one), [to], mail_from=address)
    room_id = await accept_invite(alice)
    await texts(alice, room_id, 1)
    await send(env.smtp_port, second_raw(to, two) if second_raw else make_mail(
        to=to, sender=sender, text=two), [to], mail_from=address)
    found = await texts(alice, room_id, 2)
    return room_id, next(e for e in found if one in e.body), next(e for e in found if two in e.body)


async def test_mail_that_cannot_be_verified_is_said_once(running: Env) -> None:
    alice = await running.new_user()
    sender = f"Una <una@{unique('plain')}.test>"  # no SPF, no DKIM, no DMARC record
    room_id, first, second = await _two_mails(running, alice, sender)
    assert "could not verify" in first.body and "said once" in first.body
    assert "could not verify" not in second.body
    state = await asyncio.to_thread(
        running.synapse.request, "GET", f"/_matrix/client/v3/rooms/{room_id}/state/m.room.topic",
        None, alice.access_token)
    assert "not verified" in state["topic"]


async def test_a_failed_check_is_said_on_every_mail(running: Env) -> None:
    domain = f"{unique('lax')}.test"
    running.dns.txt(domain, "v=spf1 ip4:192.0.2.10 -all")
    running.dns.txt(f"_dmarc.{domain}", "v=DMARC1; p=none")
    alice = await running.new_user()
    _, first, second = await _two_mails(running, alice, f"CEO <ceo@{domain}>")
    assert "could not verify" in first.body and "could not verify" in second.body
    assert "said once" not in second.body


async def test_a_sender_who_always_passed_and_then_does_not_is_flagged(running: Env) -> None:
    import dkim

    from .dkimkeys import make_key

    key = make_key()
    domain = f"{unique('signed')}.test"
    running.dns.txt(f"sel._domainkey.{domain}", key.record)
    alice = await running.new_user()

    def signed(to: str, token: str) -> bytes:
        msg = make_mail(to=to, sender=f"Sam <sam@{domain}>", text=token)
        raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
        return dkim.sign(raw, b"sel", domain.encode(), key.private_pem,
                         include_headers=[b"from", b"to", b"subject", b"message-id"]) + raw

    _, first, second = await _two_mails(running, alice, f"Sam <sam@{domain}>", first_raw=signed)
    assert "could not verify" not in first.body
    assert "could not verify" in second.body  # the standing changed: said again


async def test_the_correspondent_has_one_name_from_the_invite_on(running: Env) -> None:
    from nio import RoomMemberEvent

    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    sender = f"Nora Name <nora@{unique('names')}.test>"
    address = sender.rpartition("<")[2].rstrip(">")
    await send(running.smtp_port, make_mail(to=to, sender=sender, text=unique("n")), [to],
               mail_from=address)
    room_id = await accept_invite(alice)
    await texts(alice, room_id, 1)
    from .harness import room_history

    ghost = "@_email_" + address.replace("@", "=40") + ":localhost"
    names = [e.content.get("displayname") for e in await room_history(alice, room_id)
             if isinstance(e, RoomMemberEvent) and e.state_key == ghost]
    # Created with its final name: no "changed their name" line in the timeline.
    assert names and set(names) == {f"Nora Name ({address})"}, names


async def test_a_group_conversation_is_threaded_with_attachments_beside_their_text(
    running: Env,
) -> None:
    """email.threads auto: lists and groups are threaded; a mail's files follow their mail."""
    from .harness import room_history
    from .test_every_device import PNG_1x1

    alice = await running.new_user()
    to = f"{local(alice.user_id)}@localhost"
    first_id = f"<{unique('g1')}@example.org>"
    first = make_mail(to=to, cc="carol@example.net", subject="Team", text=unique("root"),
                      message_id=first_id)
    first.add_attachment(PNG_1x1, maintype="image", subtype="png", filename="a.png")
    await send(running.smtp_port, first, [to])
    room_id = await accept_invite(alice)
    second = make_mail(to=to, cc="carol@example.net", subject="Re: Team", text=unique("reply"),
                       headers={"In-Reply-To": first_id, "References": first_id})
    second.add_attachment(PNG_1x1, maintype="image", subtype="png", filename="b.png")
    await send(running.smtp_port, second, [to])
    found = await texts(alice, room_id, 2)
    root, reply = found[0], found[1]
    assert reply.source["content"]["m.relates_to"]["rel_type"] == "m.thread"
    assert reply.source["content"]["m.relates_to"]["event_id"] == root.event_id

    def image(name: str) -> dict:
        for e in events:
            content = getattr(e, "source", {}).get("content", {})
            if content.get("msgtype") == "m.image" and content.get("body") == name:
                return content
        raise AssertionError(f"no {name}")

    for _ in range(60):
        events = await room_history(alice, room_id)
        if sum(1 for e in events
               if getattr(e, "source", {}).get("content", {}).get("msgtype") == "m.image") >= 2:
            break
        await asyncio.sleep(0.5)
    assert "m.relates_to" not in image("a.png")  # the root mail's file: in the timeline
    assert image("b.png")["m.relates_to"]["event_id"] == root.event_id  # in the thread
