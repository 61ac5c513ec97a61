"""Postfix in front of the bridge: the policy service, the deploy/ files, and a real Postfix.

The policy tests speak the protocol to bridge/email/policy.py directly. The integration tests
run a throwaway Postfix (tests/postfix.py) built from deploy/postfix-main.cf and
deploy/postfix-master.cf, in front of a bridge of its own (the `postfix` bridge of tests/stack.py:
LMTP and the policy service), and skip with the reason when Postfix is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
import smtplib
import subprocess
from collections.abc import AsyncIterator, Iterator
from email.utils import parseaddr
from pathlib import Path

import dkim
import pytest
from nio import RoomMessageText
from ruamel.yaml import YAML

import bridge.email.inbound as inbound_module
from bridge.config import write_values
from bridge.email.mailbox import NO_SUCH_USER, OK, RELAY_DENIED
from bridge.email.policy import (
    CHECK_FAILED,
    CHECK_TOO_SLOW,
    MAX_ATTRIBUTES,
    MAX_LINE,
    PolicyServer,
    action_for,
    start_policy_server,
)
from bridge.quickstart.synapse import free_port

from .dkimkeys import make_key
from .harness import Env, accept_invite, send_text, wait_for_event
from .mail import make_mail, send, unique
from .postfix import Ports, Postfix, unavailable
from .relay import Received, TestRelay
from .stack import POSTFIX_USERS
from .test_every_device import bridge_db, held, until

DEPLOY = Path(__file__).parent.parent / "deploy"


def request(**attributes: str) -> bytes:
    """A policy request as Postfix writes it (the attributes it always sends, and these)."""
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "client_address": "192.0.2.1", "helo_name": "mx.example.org",
            "sender": "bob@example.org", "instance": "1a2b.5f3c.1", "recipient_count": "0"}
    base.update(attributes)
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


class FakeMailboxes:
    """alice@ours exists; anything else in our domain does not; "slow@" and "boom@" misbehave."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, address: str) -> str:
        self.asked.append(address)
        local = address.rpartition("@")[0].lower()
        if local == "slow":
            await asyncio.sleep(3600)
        if local == "boom":
            raise RuntimeError("homeserver exploded")
        if local == "full":
            return "452 4.2.2 Mailbox full; try again later"
        return OK if local in ("alice", "alice+tag") else NO_SUCH_USER


@pytest.fixture
async def policy() -> AsyncIterator[tuple[PolicyServer, FakeMailboxes]]:
    check = FakeMailboxes()
    server = PolicyServer(check, domain="ours.test", request_timeout=0.5, check_timeout=0.5)
    await server.start("127.0.0.1", 0)
    try:
        yield server, check
    finally:
        await server.stop()


async def ask(port: int, *requests: bytes) -> list[str]:
    """Send the requests on one connection; the answers, one per request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    try:
        for req in requests:
            writer.write(req)
            await writer.drain()
            answer = await asyncio.wait_for(reader.readuntil(b"\n\n"), 5)
            answers.append(answer.decode())
    finally:
        writer.close()
    return answers


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_policy_answers_dunno_for_a_mailbox_and_the_listeners_status_otherwise(policy):
    server, check = policy
    answers = await ask(
        server.port,
        request(recipient="alice@ours.test"),
        request(recipient="Alice+tag@OURS.test"),
        request(recipient="nobody@ours.test"),
        request(recipient="full@ours.test"),
    )
    assert answers == [
        "action=DUNNO\n\n",
        "action=DUNNO\n\n",
        f"action={NO_SUCH_USER}\n\n",
        "action=452 4.2.2 Mailbox full; try again later\n\n",
    ]
    assert answers[2].startswith("action=550 5.1.1 ")
    assert check.asked == ["alice@ours.test", "Alice+tag@OURS.test", "nobody@ours.test",
                           "full@ours.test"]


async def test_policy_leaves_other_domains_and_other_states_to_postfix(policy):
    server, check = policy
    answers = await ask(
        server.port,
        request(recipient="bob@example.org"),  # reject_unauth_destination decides that one
        request(protocol_state="MAIL", recipient=""),  # misplaced in smtpd_sender_restrictions
        request(request="something_else", recipient="alice@ours.test"),
    )
    assert answers == ["action=DUNNO\n\n"] * 3
    assert check.asked == []


async def test_policy_check_failures_are_temporary(policy):
    server, _ = policy
    answers = await ask(server.port, request(recipient="boom@ours.test"),
                        request(recipient="slow@ours.test"), request(recipient="alice@ours.test"))
    assert answers == [f"action={CHECK_FAILED}\n\n", f"action={CHECK_TOO_SLOW}\n\n",
                       "action=DUNNO\n\n"]
    assert all(a.startswith("action=451 4.") for a in answers[:2])


@pytest.mark.parametrize(
    "garbage",
    [
        b"request=smtpd_access_policy\nno equals sign here\n\n",
        b"=value\n\n",
        b"recipient=" + b"a" * (MAX_LINE + 10) + b"\n\n",
        b"".join(b"x%d=y\n" % i for i in range(MAX_ATTRIBUTES + 1)) + b"\n",
        b"recipient=\xff\xfe@ours.test\n\n",
    ],
    ids=["no-equals", "no-name", "long-line", "too-many-attributes", "not-utf8"],
)
async def test_policy_closes_the_connection_on_garbage(policy, garbage: bytes):
    server, check = policy
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(garbage)
    await writer.drain()
    assert await closed_by_server(reader)
    writer.close()
    assert check.asked == []
    # The server itself is fine.
    assert await ask(server.port, request(recipient="alice@ours.test")) == ["action=DUNNO\n\n"]


async def test_policy_closes_a_request_that_stalls(policy):
    server, check = policy
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"request=smtpd_access_policy\nrecipient=alice@ours.test\n")  # no blank line
    await writer.drain()
    assert await closed_by_server(reader)  # after request_timeout (0.5 s here)
    writer.close()
    assert check.asked == []


async def test_policy_stop_closes_idle_connections():
    # Postfix keeps its connections open between mails: stopping must not wait for it.
    server = await start_policy_server(FakeMailboxes(), "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request(recipient="alice@ours.test"))
    await reader.readuntil(b"\n\n")
    await asyncio.wait_for(server.stop(), 5)
    assert await closed_by_server(reader)
    writer.close()


async def test_policy_server_never_started_stops_quietly():
    await asyncio.wait_for(PolicyServer(FakeMailboxes()).stop(), 5)  # email.policy port 0


async def test_policy_connection_limit():
    server = await PolicyServer(FakeMailboxes(), max_connections=1).start("127.0.0.1", 0)
    try:
        first_reader, first = await asyncio.open_connection("127.0.0.1", server.port)
        first.write(request(recipient="alice@ours.test"))
        await first_reader.readuntil(b"\n\n")  # now certainly counted
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        assert await closed_by_server(reader)
        writer.close()
        first.close()
    finally:
        await server.stop()


async def test_recipient_status_is_the_listeners_rcpt_decision():
    from types import SimpleNamespace

    from bridge.email.mailbox import LocalRecipient
    from bridge.email.policy import MAILBOX_FULL, recipient_status
    from bridge.email.ratelimit import SlidingWindow

    known = {"alice@ours.test": "@alice:ours.test", "full@ours.test": "@full:ours.test",
             "busy@ours.test": "@busy:ours.test"}

    async def check(address: str):
        user = known.get(address)
        return (LocalRecipient(user, address, ""), OK) if user else (None, NO_SUCH_USER)

    async def mailbox_full(user_id: str) -> bool:
        return user_id == "@full:ours.test"

    per_recipient = SlidingWindow(1, 3600)
    per_recipient.hit("@busy:ours.test")
    handler = SimpleNamespace(recipients=SimpleNamespace(check=check),
                              mailbox_full=mailbox_full, per_recipient=per_recipient)
    status = recipient_status(handler)  # type: ignore[arg-type]
    assert await status("alice@ours.test") == OK
    assert await status("nobody@ours.test") == NO_SUCH_USER
    assert await status("full@ours.test") == MAILBOX_FULL
    assert (await status("busy@ours.test")).startswith("451 4.7.1 Too much mail for this mailbox")


def test_action_for_keeps_answers_on_one_line():
    assert action_for(OK) == "DUNNO"
    assert action_for(RELAY_DENIED) == RELAY_DENIED
    assert action_for("550 5.1.1 two\r\nlines") == "550 5.1.1 two lines"


# --- A real Postfix in front of the `postfix` bridge (tests/stack.py) -------------------------

DOMAIN = "cloakroom.test"  # the postfix bridge's email.domain (its Matrix users are :localhost)
DKIM_KEY = make_key()
HELD = f"pf3@{DOMAIN}"  # routed through a transport that waits for `postqueue -f`
HOLD_LIMIT = 2  # email.hold.max_messages of the postfix bridge
NOBODY = "pfnobody"


@pytest.fixture(scope="module")
def postfix(request: pytest.FixtureRequest) -> Iterator[Postfix]:
    """Postfix (deploy/'s configuration) in front of the postfix bridge, and a sink behind it."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    if not hasattr(inbound_module, "PolicyServer"):
        pytest.skip("the bridge does not start the policy service yet (bridge/email/inbound.py)")
    env: Env = request.getfixturevalue("env")  # only now: the stack takes a while to start
    sink = TestRelay().start()
    ports = Ports(smtpd=free_port(), submission=free_port(), lmtp=free_port(),
                  policy=free_port(), sink=sink.port)
    server = Postfix(ports, domain=DOMAIN, held=[HELD], sink=sink)
    # The bridge signs what it sends (email.dkim): the signature must survive Postfix.
    key_path = env.base_dir / "postfix-dkim.pem"
    key_path.write_bytes(DKIM_KEY.private_pem)
    key_path.chmod(0o600)
    write_values(env.postfix.config_path, {
        "email.dkim.selector": "pf",
        "email.dkim.private_key": str(key_path),
        "email.domain": DOMAIN,
        "email.listen.port": ports.lmtp,
        "email.policy.listen.port": ports.policy,
        "email.relay.host": "127.0.0.1",
        "email.relay.port": ports.submission,
        "email.relay.security": "none",
        "email.auth.trusted_authserv_id": server.hostname,
        "email.hold.max_messages": HOLD_LIMIT,
        # A permitted user who does not exist, to be told apart from one who is not permitted.
        "permissions": {"localhost": "none", f"@{NOBODY}:localhost": "user",
                        **{f"@{u}:localhost": "user" for u in POSTFIX_USERS}},
    })
    try:
        server.start()
        env.postfix.start()
        yield server
    finally:
        env.postfix.stop()
        server.stop()
        sink.stop()


async def deliver_through(postfix: Postfix, to: str, **mail: str) -> str:
    """A mail into Postfix's port 25 for ``to``; returns the unique text in its body."""
    token = unique("pf")
    await send(postfix.ports.smtpd, make_mail(to=to, text=f"Through Postfix {token}", **mail),
               [to])
    return token


async def wait_in_thread(postfix: Postfix, what: str, predicate, timeout: float = 60) -> None:
    await asyncio.to_thread(postfix.wait_for, predicate, what, timeout)


def body_with(token: str):
    return lambda e: isinstance(e, RoomMessageText) and token in e.body


async def test_mail_through_postfix_arrives_decrypted_in_matrix(running: Env, postfix: Postfix):
    alice = await running.new_user("pf1")
    token = await deliver_through(postfix, f"pf1@{DOMAIN}")
    room_id = await accept_invite(alice, inviter_prefix="@_email4_")
    event = await wait_for_event(alice, room_id, body_with(token))
    assert event.sender.startswith("@_email4_")
    # It went Postfix → LMTP → bridge: Postfix's log has the delivery to the bridge's port.
    (line,) = postfix.deliveries(f"pf1@{DOMAIN}", "sent")
    assert f"127.0.0.1[127.0.0.1]:{postfix.ports.lmtp}" in line and "250 2.0.0" in line


async def test_postfix_refuses_what_the_bridge_would_refuse_at_rcpt(
    running: Env, postfix: Postfix
):
    # pf2 exists but never logs in: the mail waits in the bridge, up to HOLD_LIMIT messages.
    await running.register("pf2")
    for _ in range(HOLD_LIMIT):
        await deliver_through(postfix, f"pf2@{DOMAIN}")
    await wait_in_thread(postfix, f"{HOLD_LIMIT} mails handed to the bridge",
                         lambda: len(postfix.deliveries(f"pf2@{DOMAIN}", "sent")) == HOLD_LIMIT)
    # Handed over is not yet held: the bridge's delivery worker finds that pf2 has no device.
    # (Until then the policy service says DUNNO; a mail that slips in is refused with 452 over
    # LMTP and waits in Postfix's queue: deferred, never bounced.)
    db = bridge_db(running, YAML(typ="safe").load(running.postfix.config_path.read_text()))
    await until(lambda: held(running, "@pf2:localhost", db) == HOLD_LIMIT,
                what=f"{HOLD_LIMIT} mails held for pf2")
    refusals = {
        f"{NOBODY}@{DOMAIN}": (550, b"5.1.1"),
        f"outsider@{DOMAIN}": (550, b"5.7.1"),  # not permitted on the postfix bridge
        f"pf2@{DOMAIN}": (452, b"4.2.2"),  # mailbox full
    }
    for address, (code, enhanced) in refusals.items():
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            await deliver_through(postfix, address)
        ((got_code, text),) = refused.value.recipients.values()
        assert (got_code, text[:5]) == (code, enhanced), (address, text)
    # Refused before queueing: nothing for them reached Postfix's queue, so nothing bounces.
    log = postfix.log_lines()
    for address in refusals:
        assert any("NOQUEUE: reject: RCPT" in line and f"to=<{address}>" in line for line in log)
        assert not postfix.deliveries(address, "bounced")
    assert len(postfix.deliveries(f"pf2@{DOMAIN}", "sent")) == HOLD_LIMIT
    assert postfix.queue() == []
    # One good and one unknown recipient: the good one is still delivered.
    alice = f"pf1@{DOMAIN}"
    nobody = f"{NOBODY}@{DOMAIN}"
    refused_now = await send(postfix.ports.smtpd, make_mail(to=alice), [alice, nobody])
    assert list(refused_now) == [nobody]


async def test_postfix_keeps_mail_while_the_bridge_is_down(running: Env, postfix: Postfix):
    carol = await running.new_user("pf3")
    token = await deliver_through(postfix, HELD)
    # Accepted and queued; its transport waits for a flush (defer_transports).
    await wait_in_thread(postfix, "the mail queued", lambda: len(postfix.queue()) == 1)
    running.postfix.stop()
    # Meanwhile nothing new is accepted unchecked: Postfix cannot ask, and says try later.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        await deliver_through(postfix, f"pf1@{DOMAIN}")
    ((code, text),) = refused.value.recipients.values()
    assert (code, text[:5]) == (451, b"4.3.5"), text
    postfix.flush()
    await wait_in_thread(postfix, "a failed delivery attempt while the bridge is down",
                         lambda: any("Connection refused" in line
                                     for line in postfix.deliveries(HELD, "deferred")))
    assert len(postfix.queue()) == 1  # still there
    running.postfix.start()
    postfix.flush()
    await wait_in_thread(postfix, "the mail delivered", lambda: postfix.deliveries(HELD, "sent"))
    room_id = await accept_invite(carol, inviter_prefix="@_email4_")
    await wait_for_event(carol, room_id, body_with(token))
    assert postfix.queue() == []


async def test_an_answer_from_matrix_leaves_through_postfix(running: Env, postfix: Postfix):
    dave = await running.new_user("pf4")
    message_id = f"<{unique('in')}@example.org>"
    await deliver_through(postfix, f"pf4@{DOMAIN}", subject="Lunch?", message_id=message_id)
    room_id = await accept_invite(dave, inviter_prefix="@_email4_")
    await wait_for_event(dave, room_id, lambda e: isinstance(e, RoomMessageText))
    token = unique("answer")
    await send_text(dave, room_id, f"Yes please {token}")
    sink: TestRelay = postfix.sink
    (mail,) = await asyncio.to_thread(sink.wait_for, lambda r: token.encode() in r.data)
    assert isinstance(mail, Received)
    assert mail.mail_from == f"pf4@{DOMAIN}" and mail.rcpt_tos == ["bob@example.org"]
    msg = mail.message
    assert parseaddr(msg["From"])[1] == f"pf4@{DOMAIN}"
    assert parseaddr(msg["To"])[1] == "bob@example.org"
    assert msg["Subject"] == "Re: Lunch?"
    assert msg["In-Reply-To"] == message_id and message_id in msg["References"]
    assert msg["Message-ID"]
    # It passed through Postfix's loopback service (the bridge's relay), not around it.
    assert f"by {postfix.hostname} (Postfix)" in msg["Received"]
    # Signed by the bridge, and still valid after Postfix handled it.
    assert msg["DKIM-Signature"] and f"d={DOMAIN}" in msg["DKIM-Signature"].replace(" ", "")
    assert dkim.verify(mail.data, dnsfunc=lambda _name, timeout=5: DKIM_KEY.record.encode())
    assert any("postfix/cloakroom/smtpd" in line and "client=localhost" in line
               for line in postfix.log_lines())
    assert postfix.deliveries("bob@example.org", "sent")


async def test_a_forged_authentication_results_header_is_removed_by_postfix(
    running: Env, postfix: Postfix
):
    # The bridge believes Authentication-Results from mx.cloakroom.test (trusted_authserv_id):
    # one that comes from outside must not reach it, or anyone could claim dmarc=pass.
    erin = await running.new_user("pf5")
    forged = f"{postfix.hostname}; spf=pass smtp.mailfrom=example.org; dkim=pass " \
             "header.d=example.org; dmarc=pass header.from=example.org"
    token = await deliver_through(postfix, f"pf5@{DOMAIN}",
                                  headers={"Authentication-Results": forged})
    room_id = await accept_invite(erin, inviter_prefix="@_email4_")
    event = await wait_for_event(erin, room_id, body_with(token))
    # Checked by the bridge itself instead: from 127.0.0.1 nothing verifies.
    assert "could not verify" in event.body


def test_deploy_files_are_commented_and_name_what_the_tests_replace():
    main = (DEPLOY / "postfix-main.cf").read_text()
    master = (DEPLOY / "postfix-master.cf").read_text()
    for needle in ("virtual_transport = lmtp:inet:127.0.0.1:10025",
                   "check_policy_service inet:127.0.0.1:10031", "header_checks ="):
        assert needle in main
    assert "127.0.0.1:10587 inet" in master
    assert "\nsmtp      inet" in master


def test_systemd_unit_verifies():
    unit = DEPLOY / "cloakroom.service"
    text = unit.read_text()
    for needle in ("ProtectSystem=strict", "StateDirectory=cloakroom", "NoNewPrivileges=yes",
                   "PrivateTmp=yes", "RestrictAddressFamilies=",
                   "-m bridge -c /etc/cloakroom/config.yaml"):
        assert needle in text
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (only the unit's settings were checked)")
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    # ExecStart's interpreter is not installed here; every other complaint is a real one.
    problems = [line for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip() and "/opt/cloakroom" not in line]
    assert not problems, problems
    # systemd's own exposure score (0 best, 10 worst): the unit stays well hardened.
    proc = subprocess.run([analyze, "security", "--offline=yes", "--threshold=20", str(unit)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
