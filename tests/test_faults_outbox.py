"""Faults on the way out (issue 10): replies written while the relay is away, the bridge killed
with its outbox full, the relay back (first busy, then accepting). Each reply leaves once.

Two users with four replies each: the test stack limits a user to 5 recipients per 20 s
(tests/stack.py OUTBOUND_LIMIT), and the point is a full outbox, not the rate limit.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from nio import AsyncClient

from .harness import Env
from .mail import unique
from .test_email_out import _containing, _portal, _say
from .test_every_device import query, until
from .test_faults import kick_homeserver

USERS, REPLIES = 2, 4


def _outbox(db: Path, event_ids: list[str]) -> list[tuple[str, str, int]]:
    marks = ",".join("?" * len(event_ids))
    return query(db, f"SELECT event_id, state, attempts FROM outbox WHERE event_id IN ({marks})",
                 *event_ids)


async def test_replies_while_the_relay_is_down_and_the_bridge_killed_leave_once(
    running: Env,
) -> None:
    db = running.base_dir / "bridge.db"
    users: list[tuple[AsyncClient, str, str, str]] = []  # client, room, thread root, correspondent
    for _ in range(USERS):
        client = await running.new_user()
        correspondent = f"{unique('away')}@example.org"
        room_id, root, _ = await _portal(running, client, correspondent)
        users.append((client, room_id, root.event_id, correspondent))
    busy = users[-1][3]
    started = time.monotonic()
    tokens: dict[str, str] = {}  # event ID → token
    running.relay.down()
    try:
        for client, room_id, root, _ in users:
            for n in range(REPLIES):
                token = unique(f"outbox{n}")
                tokens[await _say(client, room_id, token, thread=root)] = token
        events = list(tokens)
        # The outbox is full: every reply queued and tried at least once against a dead relay.
        await until(lambda: len(rows := _outbox(db, events)) == len(events)
                    and all(attempts >= 1 for _, _, attempts in rows),
                    what="every reply tried against the dead relay")
        tried = sum(attempts for _, _, attempts in _outbox(db, events))
        assert running.bridge.stop(signal.SIGKILL) == -signal.SIGKILL
        # Back, but busy at first for one correspondent: two 4xx before it accepts.
        running.relay.script(busy, "451 4.3.0 busy", "421 4.3.2 try again later")
        running.relay.up()
        await asyncio.to_thread(running.bridge.start)
        await asyncio.to_thread(kick_homeserver, running)
        await until(lambda: all(state == "sent" for _, state, _ in _outbox(db, events)),
                    timeout=120, what="every reply sent")
    finally:
        running.relay.up()
        running.relay.scripts[busy].clear()
    # Every row is finished: the outbox will not send any of them again, so counting is final.
    mailed = {token: len(running.relay.find(_containing(token))) for token in tokens.values()}
    rows = _outbox(db, events)
    print(f"\n[faults] outbox, relay down + bridge SIGKILLed: replies={len(tokens)}, "
          f"attempts_before_kill={tried}, mailed={sum(1 for n in mailed.values() if n)}, "
          f"duplicates={sum(n - 1 for n in mailed.values() if n > 1)}, "
          f"lost={sum(1 for n in mailed.values() if not n)}, "
          f"attempts_total={sum(a for _, _, a in rows)}, s={time.monotonic() - started:.1f}")
    assert all(n == 1 for n in mailed.values()), mailed
