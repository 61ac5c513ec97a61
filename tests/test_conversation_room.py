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
