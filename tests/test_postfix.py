"""Postfix in front of the bridge: the policy service, the deploy/ files, and a real Postfix.

The policy tests speak the protocol to bridge/email/policy.py directly. The integration tests
run a throwaway Postfix (tests/postfix.py) built from deploy/postfix-main.cf and
deploy/postfix-master.cf, in front of a bridge of its own (the `postfix` bridge of tests/stack.py:
LMTP and the policy service), and skip with the reason when Postfix is not installed.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

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


def test_action_for_keeps_answers_on_one_line():
    assert action_for(OK) == "DUNNO"
    assert action_for(RELAY_DENIED) == RELAY_DENIED
    assert action_for("550 5.1.1 two\r\nlines") == "550 5.1.1 two lines"
