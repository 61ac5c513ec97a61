"""Faults under load (issue 10): the bridge killed, the homeserver frozen or crashed, a SIGTERM
with SMTP sessions open. Every scenario counts what it sent and what arrived, and prints it.

Sizes are scaled down from the issue (300 mails, a 30 s freeze) so that all fault tests together
stay within a few minutes on a shared 2-core machine; each keeps its point: faults land while
mail is both being accepted and being delivered.

Exactly-once is checked by counting, without sleeps: a mail is *accepted* when its client read
the 250; the test then polls the rooms until every accepted mail is there (or a deadline), and
counts copies. A copy beyond the first is a duplicate — except when the client itself sent the
mail again because a connection died after the final "." and before the reply (the ambiguous
case RFC 5321 §6.1 leaves to the sender: a real MTA resends too). Such resends are counted and
printed as ``in doubt``, and allowed one copy each.
"""

from __future__ import annotations

import asyncio
import random
import re
import secrets
import signal
import smtplib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from nio import AsyncClient, InviteMemberEvent, MegolmEvent, RoomMessageText

from .harness import Env, room_history, sync_until
from .mail import make_mail, unique

# How long a client waits for the bridge's answer to one command: longer than any honest answer,
# short enough that a hung session shows as a failure rather than a stuck test.
SMTP_TIMEOUT = 30.0
# What an MTA waits before it tries a cut connection again (a client's pacing, not a test sync).
RETRY_PAUSE = 0.2


# The load: MTAs that retry until they hear 250 --------------------------------------------------


@dataclass
class Mail:
    token: str
    sender: str
    data: bytes
    attempts: int = 0
    in_doubt: int = 0  # attempts cut after the final "." was sent and before the reply
    accepted: bool = False
    refused: str | None = None  # a 5xx answer: the mail is not ours to deliver


@dataclass
class MailLoad:
    """`connections` MTAs, each sending its mails in turn over one SMTP session to `to`, from
    its own correspondent. A cut session (refused connect, reset, 421, any 4xx) is dropped and
    the same mail sent again on a new one, as an MTA does."""

    port: int
    to: str
    connections: int
    per_connection: int
    tag: str = field(default_factory=lambda: unique("load"))
    deadline_seconds: float = 240.0
    mails: list[list[Mail]] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _accepted: int = 0

    def __post_init__(self) -> None:
        for c in range(self.connections):
            sender = f"{self.tag}-c{c}@example.org"
            row = []
            for n in range(self.per_connection):
                token = f"{self.tag} c{c} n{n}"
                msg = make_mail(to=self.to, sender=f"Load {c} <{sender}>",
                                subject=f"Load {c}", text=token)
                row.append(Mail(token, sender,
                                msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))))
            self.mails.append(row)

    @property
    def senders(self) -> list[str]:
        return [row[0].sender for row in self.mails]

    @property
    def accepted(self) -> int:
        with self.lock:
            return self._accepted

    @property
    def all(self) -> list[Mail]:
        return [m for row in self.mails for m in row]

    def _failed(self, kind: str) -> None:
        with self.lock:
            self.failures[kind] += 1

    def _attempt(self, smtp: smtplib.SMTP, mail: Mail) -> bool:
        """One try on an open session: True on 250. Raises on a cut session or a 4xx."""
        mail.attempts += 1
        smtp.ehlo_or_helo_if_needed()
        for command, ok in ((f"MAIL FROM:<{mail.sender}>", (250,)),
                            (f"RCPT TO:<{self.to}>", (250, 251)),
                            ("DATA", (354,))):
            code, text = smtp.docmd(command)
            if code not in ok:
                raise smtplib.SMTPResponseException(code, text)
        # smtplib.data() in steps, to know when the whole message has left: from then on a cut
        # session leaves the mail in doubt (maybe committed, the 250 lost).
        body = re.sub(rb"(?m)^\.", b"..", mail.data)
        smtp.send(body + (b"" if body.endswith(b"\r\n") else b"\r\n") + b".\r\n")
        try:
            code, text = smtp.getreply()
        except (smtplib.SMTPException, OSError):
            mail.in_doubt += 1
            raise
        if code != 250:
            raise smtplib.SMTPResponseException(code, text)
        return True

    def _connection(self, index: int) -> None:
        deadline = time.monotonic() + self.deadline_seconds
        smtp: smtplib.SMTP | None = None
        for mail in self.mails[index]:
            while not mail.accepted and mail.refused is None:
                if time.monotonic() > deadline:
                    return
                try:
                    if smtp is None:
                        smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=SMTP_TIMEOUT)
                    if self._attempt(smtp, mail):
                        mail.accepted = True
                        with self.lock:
                            self._accepted += 1
                except smtplib.SMTPResponseException as e:
                    if e.smtp_code >= 500:
                        mail.refused = f"{e.smtp_code} {e.smtp_error!r}"
                    self._failed(str(e.smtp_code))
                    smtp = _drop(smtp)
                except smtplib.SMTPConnectError as e:
                    # The greeting was a refusal (421 while draining or starting).
                    self._failed(str(e.smtp_code))
                    smtp = _drop(smtp)
                except (smtplib.SMTPServerDisconnected, ConnectionError, socket.timeout,
                        OSError) as e:
                    self._failed("refused" if isinstance(e, ConnectionRefusedError)
                                 else "cut")
                    smtp = _drop(smtp)
                if not mail.accepted and mail.refused is None:
                    time.sleep(RETRY_PAUSE)
        _drop(smtp)

    async def run(self) -> None:
        await asyncio.gather(*(asyncio.to_thread(self._connection, c)
                               for c in range(self.connections)))


def _drop(smtp: smtplib.SMTP | None) -> None:
    if smtp is not None:
        try:
            smtp.close()
        except OSError:
            pass
    return None


# What arrived ------------------------------------------------------------------------------------


async def join_invites(client: AsyncClient, count: int, timeout: float = 90) -> list[str]:
    """Join the `count` rooms this user is invited to (the first mail of each correspondent)."""
    deadline = time.monotonic() + timeout
    while len(client.invited_rooms) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(client.invited_rooms)} of {count} invites came")
        await sync_until(client, lambda rid, e: isinstance(e, InviteMemberEvent), timeout=30)
    rooms = list(client.invited_rooms)
    for room_id in rooms:
        await client.join(room_id)
    while not set(rooms) <= set(client.rooms) - set(client.invited_rooms):
        if time.monotonic() > deadline:
            raise TimeoutError("the joins did not come back in a sync")
        await client.sync(timeout=1000)
    return rooms


async def setup_rooms(env: Env, client: AsyncClient, load: MailLoad) -> list[str]:
    """One room per correspondent of the load, joined before the faults start."""
    from .mail import send

    for sender in load.senders:
        msg = make_mail(to=load.to, sender=sender, subject="Setup", text=f"setup {sender}")
        assert await send(env.smtp_port, msg, [load.to], mail_from=sender) == {}
    return await join_invites(client, len(load.senders))


@dataclass
class Tally:
    accepted: int
    delivered: int  # distinct accepted mails found in the rooms
    duplicates: int  # copies beyond the first, net of the client's own resends in doubt
    in_doubt: int  # resends after a lost 250 (allowed one copy each)
    in_doubt_twice: int  # of those, how many did arrive twice (committed, then the 250 lost)
    lost: int
    undecryptable: int
    unexpected: int  # mail that was never accepted but arrived (a 250 never sent)

    def show(self, title: str, **extra: object) -> None:
        figures = ", ".join(f"{k}={v}" for k, v in {**self.__dict__, **extra}.items())
        print(f"\n[faults] {title}: {figures}")


async def _copies(client: AsyncClient, rooms: list[str], tag: str) -> tuple[Counter[str], int]:
    pattern = re.compile(re.escape(tag) + r" c\d+ n\d+")
    copies: Counter[str] = Counter()
    undecryptable = 0
    for room_id in rooms:
        for event in await room_history(client, room_id):
            if isinstance(event, MegolmEvent) and event.sender.startswith("@_email"):
                undecryptable += 1
            elif isinstance(event, RoomMessageText):
                copies.update(set(pattern.findall(event.body)))
    return copies, undecryptable


async def tally(client: AsyncClient, rooms: list[str], load: MailLoad,
                timeout: float = 180) -> Tally:
    """Poll the rooms until every accepted mail is there and readable (or the deadline)."""
    accepted = {m.token for m in load.all if m.accepted}
    deadline = time.monotonic() + timeout
    while True:
        copies, undecryptable = await _copies(client, rooms, load.tag)
        if (accepted <= set(copies) and not undecryptable) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    in_doubt = sum(m.in_doubt for m in load.all)
    allowed = {m.token: 1 + m.in_doubt for m in load.all}
    return Tally(
        accepted=len(accepted),
        delivered=len(accepted & set(copies)),
        duplicates=sum(max(0, n - allowed.get(t, 1)) for t, n in copies.items()),
        in_doubt=in_doubt,
        in_doubt_twice=sum(1 for m in load.all if m.in_doubt and copies[m.token] > 1),
        lost=len(accepted - set(copies)),
        undecryptable=undecryptable,
        unexpected=len(set(copies) - accepted),
    )


def assert_exactly_once(t: Tally, load: MailLoad) -> None:
    refused = [(m.token, m.refused) for m in load.all if m.refused]
    assert not refused, f"mail refused with 5xx: {refused[:5]}"
    assert t.accepted == len(load.all), f"only {t.accepted} of {len(load.all)} accepted in time"
    assert t.lost == 0, f"{t.lost} accepted mail(s) never arrived"
    assert t.duplicates == 0, f"{t.duplicates} duplicate(s)"
    assert t.undecryptable == 0, f"{t.undecryptable} message(s) the reader cannot decrypt"
    assert t.unexpected == 0, f"{t.unexpected} mail(s) arrived that were never answered 250"
    assert t.delivered == t.accepted


async def when(check: Callable[[], bool], timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.05)


def kick_homeserver(env: Env) -> None:
    """Ask Synapse to ping the bridge: a successful ping ends its appservice back-off at once.

    After the bridge was down, Synapse retries its transactions with a growing delay (up to
    8.5 min); the bridge does not ping on start, so without this the tests after ours could
    wait for events that Synapse holds back."""
    as_id = env.config["appservice"]["id"]
    try:
        env.synapse.request("POST", f"/_matrix/client/v1/appservice/{as_id}/ping", {},
                            env.config["appservice"]["as_token"])
    except OSError:
        pass  # best effort: only shortens a wait


class BridgeLog:
    """Lines the bridge logged since this object was made (to count its retries)."""

    def __init__(self, env: Env) -> None:
        self.path = env.bridge.log_path
        self.offset = self.path.stat().st_size

    def count(self, text: str) -> int:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return sum(text.encode() in line for line in f)


def _local(client: AsyncClient) -> str:
    return client.user_id[1:].split(":")[0]


# The scenarios -----------------------------------------------------------------------------------


# The 300 mails, scaled to 120 (4 connections × 30): two kills still land mid-stream.
KILL_CONNECTIONS, KILL_PER_CONNECTION = 4, 30


async def test_bridge_killed_twice_under_load_delivers_every_accepted_mail_once(
    running: Env,
) -> None:
    alice = await running.new_user()
    load = MailLoad(running.smtp_port, f"{_local(alice)}@localhost",
                    KILL_CONNECTIONS, KILL_PER_CONNECTION)
    rooms = await setup_rooms(running, alice, load)
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    total = len(load.all)
    # Random moments, tied to progress so that both land while mail is still coming in.
    moments = sorted([rng.randint(total // 8, total * 3 // 8),
                      rng.randint(total * 4 // 8, total * 6 // 8)])
    started = time.monotonic()
    sending = asyncio.create_task(load.run())
    kills: list[float] = []
    try:
        for moment in moments:
            await when(lambda: load.accepted >= moment or sending.done(),
                       what=f"{moment} mails accepted")
            assert running.bridge.stop(signal.SIGKILL) == -signal.SIGKILL
            down = time.monotonic()
            await asyncio.to_thread(running.bridge.start)
            kills.append(round(time.monotonic() - down, 1))
            await asyncio.to_thread(kick_homeserver, running)
        await sending
    finally:
        if not sending.done():
            sending.cancel()
    sent_in = time.monotonic() - started
    t = await tally(alice, rooms, load)
    t.show("bridge SIGKILLed twice", mails=total, connections=KILL_CONNECTIONS, seed=seed,
           kill_at_accepted=moments, restart_s=kills, failures=dict(load.failures),
           sending_s=round(sent_in, 1), total_s=round(time.monotonic() - started, 1))
    assert_exactly_once(t, load)


# The 30 s freeze, scaled to 15 s: longer than the bridge's first retries (1+2+4+8 s).
FREEZE_SECONDS = 15.0
OUTAGE_CONNECTIONS, OUTAGE_PER_CONNECTION = 2, 15


async def test_homeserver_frozen_then_crashed_during_mail_loses_and_doubles_nothing(
    running: Env,
) -> None:
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    frozen = MailLoad(running.smtp_port, to, OUTAGE_CONNECTIONS, OUTAGE_PER_CONNECTION)
    crashed = MailLoad(running.smtp_port, to, OUTAGE_CONNECTIONS, OUTAGE_PER_CONNECTION)
    rooms = await setup_rooms(running, alice, frozen)
    bridge = running.bridge.process
    assert bridge is not None

    # 1. SIGSTOP: Synapse accepts connections and answers nothing; the bridge's requests hang.
    log = BridgeLog(running)
    started = time.monotonic()
    sending = asyncio.create_task(frozen.run())
    try:
        await when(lambda: frozen.accepted >= 4 or sending.done(), what="4 mails accepted")
        running.synapse.pause()
        paused = time.monotonic()
        await sending  # mail for a user the bridge knows is still taken, 250 after commit
        accepted_frozen = frozen.accepted
        # The length of the outage is the point of the scenario, not a synchronisation.
        await asyncio.sleep(max(0.0, FREEZE_SECONDS - (time.monotonic() - paused)))
    finally:
        running.synapse.resume()
        if not sending.done():
            sending.cancel()
    frozen_for = time.monotonic() - paused
    assert bridge.poll() is None, f"the bridge exited ({bridge.returncode}) while Synapse froze"
    t = await tally(alice, rooms, frozen)
    t.show("Synapse SIGSTOPped", mails=len(frozen.all), frozen_s=round(frozen_for, 1),
           accepted_while_frozen=accepted_frozen - 4, failures=dict(frozen.failures),
           delivery_retries=log.count("retrying in"),
           total_s=round(time.monotonic() - started, 1))
    assert_exactly_once(t, frozen)

    # 2. SIGKILL: the homeserver crashes mid-batch and comes back on the same database.
    # New correspondents, so this half is counted on its own.
    rooms2 = await setup_rooms(running, alice, crashed)
    log = BridgeLog(running)
    started = time.monotonic()
    sending = asyncio.create_task(crashed.run())
    try:
        await when(lambda: crashed.accepted >= 4 or sending.done(), what="4 mails accepted")
        running.synapse.kill()
        down = time.monotonic()
        await asyncio.to_thread(running.synapse.start)
        restart_s = time.monotonic() - down
        await sending
    finally:
        if running.synapse.process is None:
            await asyncio.to_thread(running.synapse.start)
        if not sending.done():
            sending.cancel()
    assert bridge.poll() is None, f"the bridge exited ({bridge.returncode}) when Synapse died"
    t = await tally(alice, rooms2, crashed)
    t.show("Synapse SIGKILLed and restarted", mails=len(crashed.all),
           restart_s=round(restart_s, 1), failures=dict(crashed.failures),
           delivery_retries=log.count("retrying in"),
           total_s=round(time.monotonic() - started, 1))
    assert_exactly_once(t, crashed)
