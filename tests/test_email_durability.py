"""Nothing is lost and nothing is doubled: homeserver outages and a killed bridge.

Exactly-once is checked without sleeps: mail for one user is delivered in order, so once a
sentinel mail sent last has arrived, any duplicate would already be in the room.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

from nio import AsyncClient, RoomMessageText

from .harness import Env, accept_invite, room_history
from .mail import make_mail, send, unique


async def _bodies(client: AsyncClient, room_id: str, until: str, timeout: float = 120) -> list[str]:
    """Last lines of every text message in the room, once one of them is `until`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        lines = [
            e.body.strip().splitlines()[-1]
            for e in await room_history(client, room_id)
            if isinstance(e, RoomMessageText)
        ]
        if until in lines or loop.time() > deadline:
            return lines
        await asyncio.sleep(0.5)


async def _first_mail(env: Env, client: AsyncClient, to: str) -> str:
    await send(env.smtp_port, make_mail(to=to, subject="hello", text="first"), [to])
    room_id = await accept_invite(client)
    await _bodies(client, room_id, "first")
    return room_id


async def test_mail_waits_while_the_homeserver_is_down(running: Env) -> None:
    alice = await running.new_user()
    to = f"{alice.user_id[1:].split(':')[0]}@localhost"
    room_id = await _first_mail(running, alice, to)
    tag = unique("outage")
    running.synapse.stop()
    try:
        for n in range(20):
            # Accepted with 250 although the homeserver is down: the queue holds it.
            refused = await send(running.smtp_port, make_mail(to=to, text=f"{tag} {n}"), [to])
            assert refused == {}
    finally:
        await asyncio.to_thread(running.synapse.start)
    sentinel = unique("sentinel")
    await send(running.smtp_port, make_mail(to=to, text=sentinel), [to])
    lines = await _bodies(alice, room_id, sentinel)
    counts = Counter(lines)
    assert [counts[f"{tag} {n}"] for n in range(20)] == [1] * 20, counts
    assert lines[-1] == sentinel
    assert [line for line in lines if line.startswith(tag)] == [f"{tag} {n}" for n in range(20)]


async def test_killed_bridge_delivers_accepted_mail_once_after_restart(running: Env) -> None:
    alice = await running.new_user()
    to = f"{alice.user_id[1:].split(':')[0]}@localhost"
    room_id = await _first_mail(running, alice, to)
    token = unique("killed")
    # Hold delivery back (homeserver away) so the kill lands after 250 and before delivery.
    running.synapse.stop()
    try:
        assert await send(running.smtp_port, make_mail(to=to, text=token), [to]) == {}
        assert running.bridge.stop(signal.SIGKILL) == -signal.SIGKILL
    finally:
        await asyncio.to_thread(running.synapse.start)
    running.bridge.start()
    sentinel = unique("sentinel")
    await send(running.smtp_port, make_mail(to=to, text=sentinel), [to])
    lines = await _bodies(alice, room_id, sentinel)
    assert Counter(lines)[token] == 1, lines
    assert lines.index(token) < lines.index(sentinel)
