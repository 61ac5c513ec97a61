"""Who really sent it, end to end: real DNS records on loopback, real DKIM signatures."""

from __future__ import annotations

import asyncio
import smtplib

import dkim
import pytest
from nio import RoomMessageText

from .dkimkeys import Key, make_key
from .harness import Env, accept_invite, room_history
from .mail import make_mail, send, unique


@pytest.fixture(scope="module")
def key() -> Key:
    return make_key()


def _local(client) -> str:
    return client.user_id[1:].split(":")[0]


async def _only_text(client, room_id: str) -> RoomMessageText:
    for _ in range(60):
        texts = [e for e in await room_history(client, room_id) if isinstance(e, RoomMessageText)]
        if texts:
            return texts[0]
        await asyncio.sleep(0.5)
    raise AssertionError("no message arrived")


async def test_dkim_signed_mail_arrives_without_a_warning(running: Env, key: Key) -> None:
    domain = f"{unique('signed')}.test"
    running.dns.txt(f"sel._domainkey.{domain}", key.record)
    running.dns.txt(f"_dmarc.{domain}", "v=DMARC1; p=reject")
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    msg = make_mail(to=to, sender=f"Sam <sam@{domain}>", subject="Signed", text="genuine")
    raw = msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    signed = dkim.sign(raw, b"sel", domain.encode(), key.private_pem,
                       include_headers=[b"from", b"to", b"subject", b"message-id"]) + raw
    await send(running.smtp_port, signed, [to], mail_from=f"sam@{domain}")
    room_id = await accept_invite(alice)
    text = await _only_text(alice, room_id)
    assert "genuine" in text.body
    assert "could not verify" not in text.body


async def test_spoofed_sender_of_a_reject_domain_is_refused(running: Env) -> None:
    domain = f"{unique('bank')}.test"
    running.dns.txt(domain, "v=spf1 ip4:192.0.2.10 -all")
    running.dns.txt(f"_dmarc.{domain}", "v=DMARC1; p=reject")
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    msg = make_mail(to=to, sender=f"Bank <security@{domain}>", subject="Verify your account")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(running.smtp_port, msg, [to], mail_from=f"security@{domain}")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1")


async def test_failure_under_p_none_arrives_with_a_visible_marker(running: Env) -> None:
    domain = f"{unique('lax')}.test"
    running.dns.txt(domain, "v=spf1 ip4:192.0.2.10 -all")
    running.dns.txt(f"_dmarc.{domain}", "v=DMARC1; p=none")
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    sender = f"ceo@{domain}"
    await send(running.smtp_port, make_mail(to=to, sender=f"CEO <{sender}>", text="wire money"),
               [to], mail_from=sender)
    room_id = await accept_invite(alice)
    text = await _only_text(alice, room_id)
    assert f"⚠ could not verify that this came from {sender} (DMARC: fail)" in text.body
    assert "could not verify" in (text.formatted_body or "")


async def test_a_delta_chat_message_id_under_our_domain_is_delivered(running: Env) -> None:
    # Delta Chat writes every Message-ID as <uuid@localhost>, and the quickstart's (and this
    # stack's) email domain is localhost: such mail was answered 250 and silently dropped.
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    msg = make_mail(to=to, sender="Dee <dee@delta.test>", text="sent from Delta Chat",
                    message_id="<3f0c5a0e-1b7e-4c55-9d8e-2f1d3c4b5a69@localhost>")
    assert await send(running.smtp_port, msg, [to], mail_from="dee@delta.test") == {}
    room_id = await accept_invite(alice)
    assert "sent from Delta Chat" in (await _only_text(alice, room_id)).body


async def test_a_header_hidden_behind_a_bare_cr_is_refused(running: Env, key: Key) -> None:
    # Eve signs with her own valid key; the reader's parser would have shown Bob's From.
    domain = f"{unique('eve')}.test"
    running.dns.txt(f"sel._domainkey.{domain}", key.record)
    alice = await running.new_user()
    to = f"{_local(alice)}@localhost"
    raw = (
        f"X-Foo: bar\rFrom: Bob <bob@victim.test>\r\nFrom: Eve <eve@{domain}>\r\nTo: {to}\r\n"
        "Subject: Invoice\r\n\r\nPlease pay.\r\n"
    ).encode()
    signed = dkim.sign(raw, b"sel", domain.encode(), key.private_pem,
                       include_headers=[b"from", b"to", b"subject"]) + raw
    with pytest.raises(smtplib.SMTPDataError) as refused:
        await send(running.smtp_port, signed, [to], mail_from=f"eve@{domain}")
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.6.0 Malformed header section")
