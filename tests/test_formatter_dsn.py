"""Reading delivery status notifications (RFC 3464) as Postfix, Exim and others send them."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.formatter import Dsn, DsnRecipient, describe, parse_dsn


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode("utf-8")


POSTFIX_BOUNCE = _crlf(
    """Return-Path: <>
Received: by mx.example.org (Postfix) id 3F2A81C0012; Tue, 14 May 2024 10:01:02 +0000 (UTC)
Date: Tue, 14 May 2024 10:01:02 +0000 (UTC)
From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: alice@bridge.example
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="3F2A81C0012.1715680862/mx.example.org"
Content-Transfer-Encoding: 7bit
Message-Id: <20240514100102.3F2A81C0012@mx.example.org>

This is a MIME-encapsulated message.

--3F2A81C0012.1715680862/mx.example.org
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host mx.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients.

<bob@example.net>: host mx.example.net[192.0.2.25] said: 550 5.1.1
    <bob@example.net>: Recipient address rejected: User unknown in virtual
    mailbox table (in reply to RCPT TO command)

--3F2A81C0012.1715680862/mx.example.org
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
X-Postfix-Queue-ID: 3F2A81C0012
X-Postfix-Sender: rfc822; alice@bridge.example
Arrival-Date: Tue, 14 May 2024 10:01:01 +0000 (UTC)

Final-Recipient: rfc822; bob@example.net
Original-Recipient: rfc822;bob@example.net
Action: failed
Status: 5.1.1
Remote-MTA: dns; mx.example.net
Diagnostic-Code: smtp; 550 5.1.1 <bob@example.net>: Recipient address
    rejected: User unknown in virtual mailbox table

--3F2A81C0012.1715680862/mx.example.org
Content-Description: Undelivered Message
Content-Type: message/rfc822

Received: from bridge.example (bridge.example [198.51.100.7])
\tby mx.example.org (Postfix) with ESMTPS id 3F2A81C0012
\tfor <bob@example.net>; Tue, 14 May 2024 10:01:01 +0000 (UTC)
From: Alice <alice@bridge.example>
To: Bob <bob@example.net>
Subject: Plans
Message-ID: <k3Jx9-Qa_sent-1@bridge.example>
In-Reply-To: <older@example.net>
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"

See you at six.

--3F2A81C0012.1715680862/mx.example.org--
"""
)

EXIM_BOUNCE = _crlf(
    """Return-path: <>
From: Mail Delivery System <Mailer-Daemon@mail.example.org>
To: alice@bridge.example
References: <outgoing-42@bridge.example>
Content-Type: multipart/report; report-type=delivery-status; boundary=1715680862-eximdsn-846930886
MIME-Version: 1.0
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1s6pQU-000ABC-12@mail.example.org>
Date: Tue, 14 May 2024 10:01:02 +0000

--1715680862-eximdsn-846930886
Content-type: text/plain; charset=us-ascii

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  carol@example.net
    host mx.example.net [192.0.2.26]
    SMTP error from remote mail server after end of data:
    550 5.7.1 Message rejected as spam

--1715680862-eximdsn-846930886
Content-type: message/delivery-status

Reporting-MTA: dns; mail.example.org

Action: failed
Final-Recipient: rfc822;carol@example.net
Status: 5.0.0
Remote-MTA: dns; mx.example.net
X-Remote-MTA-smtp-greeting: X-Str; 220 mx.example.net ESMTP
Diagnostic-Code: smtp; 550 5.7.1 Message rejected as spam

--1715680862-eximdsn-846930886
Content-type: text/rfc822-headers

Return-path: <alice@bridge.example>
Received: from bridge.example ([198.51.100.7])
\tby mail.example.org with esmtps (TLS1.3) id 1s6pQT-000ABC-0a
\tfor carol@example.net; Tue, 14 May 2024 10:01:01 +0000
Message-ID: <outgoing-42@bridge.example>
From: Alice <alice@bridge.example>
To: carol@example.net
Subject: Hello

--1715680862-eximdsn-846930886--
"""
)

DELAYED = _crlf(
    """From: MAILER-DAEMON@mx.example.org (Mail Delivery System)
Subject: Delayed Mail (still being retried)
To: alice@bridge.example
MIME-Version: 1.0
Content-Type: multipart/report; report-type="delivery-status"; boundary="B1"

--B1
Content-Type: text/plain

Your message is delayed.

--B1
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org
Arrival-Date: Tue, 14 May 2024 10:01:01 +0000 (UTC)

Final-Recipient: rfc822; dave@example.net
Original-Recipient: rfc822;dave@example.net
Action: delayed
Status: 4.4.1
Diagnostic-Code: X-Postfix; connect to mx.example.net[192.0.2.27]:25: Connection
    timed out
Will-Retry-Until: Tue, 19 May 2024 10:01:01 +0000 (UTC)

--B1
Content-Type: text/rfc822-headers

From: Alice <alice@bridge.example>
Message-ID: <delayed-7@bridge.example>
Subject: Later

--B1--
"""
)

MULTIPLE = _crlf(
    """From: postmaster@relay.example.org
To: alice@bridge.example
MIME-Version: 1.0
Content-Type: multipart/report; boundary="R"; report-type=delivery-status

--R
Content-Type: text/plain

Report.
--R
Content-Type: message/delivery-status

Reporting-MTA: dns;relay.example.org

Original-Recipient: rfc822;bob@example.net
Final-Recipient: rfc822;bob.smith@internal.example.net
Action: FAILED
Status: 5.2.2 (mailbox full)
Diagnostic-Code: smtp;552-5.2.2 The email account that you tried to reach is
 over quota.
   552 5.2.2 Please try again later.

Final-Recipient: rfc822; <erin@example.net>
Action: delayed
Status: 4.2.0

Final-Recipient: rfc822;frank@example.net
Action: delivered
Status: 2.0.0
Diagnostic-Code: smtp; 250 2.0.0 OK

Final-Recipient: rfc822;grace@example.net (via the list)
Action: relayed

--R
Content-Type: message/rfc822

Message-ID: <multi-1@bridge.example>
Subject: To everyone

Hi all.
--R--
"""
)


def test_postfix_bounce() -> None:
    dsn = parse_dsn(POSTFIX_BOUNCE)
    assert dsn == Dsn(
        original_message_id="k3Jx9-Qa_sent-1@bridge.example",
        recipients=[
            DsnRecipient(
                address="bob@example.net",
                action="failed",
                status="5.1.1",
                diagnostic="550 5.1.1 <bob@example.net>: Recipient address rejected: "
                "User unknown in virtual mailbox table",
            )
        ],
        reporting_mta="mx.example.org",
    )
    assert describe(dsn.recipients[0]) == (
        "⚠ delivery to bob@example.net failed: 550 5.1.1 <bob@example.net>: "
        "Recipient address rejected: User unknown in virtual mailbox table"
    )


def test_exim_bounce_with_returned_headers_only() -> None:
    dsn = parse_dsn(EXIM_BOUNCE)
    assert dsn is not None
    assert dsn.original_message_id == "outgoing-42@bridge.example"
    assert dsn.reporting_mta == "mail.example.org"
    assert dsn.recipients == [
        DsnRecipient("carol@example.net", "failed", "5.0.0", "550 5.7.1 Message rejected as spam")
    ]


def test_delayed_notification() -> None:
    dsn = parse_dsn(DELAYED)
    assert dsn is not None
    assert dsn.original_message_id == "delayed-7@bridge.example"
    (rcpt,) = dsn.recipients
    assert (rcpt.address, rcpt.action, rcpt.status) == ("dave@example.net", "delayed", "4.4.1")
    # Any type prefix goes, not only "smtp;".
    assert rcpt.diagnostic == "connect to mx.example.net[192.0.2.27]:25: Connection timed out"
    assert describe(rcpt) == (
        "⏳ delivery to dave@example.net is delayed: "
        "connect to mx.example.net[192.0.2.27]:25: Connection timed out"
    )


def test_several_recipients_in_order() -> None:
    dsn = parse_dsn(MULTIPLE)
    assert dsn is not None
    assert dsn.original_message_id == "multi-1@bridge.example"
    assert dsn.reporting_mta == "relay.example.org"
    assert dsn.recipients == [
        # The address the mail was sent to, not the one an alias expanded it into.
        DsnRecipient(
            "bob@example.net",
            "failed",
            "5.2.2",
            "552-5.2.2 The email account that you tried to reach is over quota. "
            "552 5.2.2 Please try again later.",
        ),
        DsnRecipient("erin@example.net", "delayed", "4.2.0", None),
        DsnRecipient("frank@example.net", "delivered", "2.0.0", "250 2.0.0 OK"),
        DsnRecipient("grace@example.net", "relayed", "", None),
    ]
    assert [describe(r) for r in dsn.recipients[1:]] == [
        "⏳ delivery to erin@example.net is delayed: 4.2.0",
        "✓ delivered to frank@example.net: 250 2.0.0 OK",
        "↪ delivery to grace@example.net was relayed",
    ]


def test_base64_encoded_status_and_global_types() -> None:
    status = b"Reporting-MTA: dns; mx.example.org\r\n\r\nFinal-Recipient: rfc822; b@example.net\r\n"
    status += b"Action: failed\r\nStatus: 5.1.1\r\nDiagnostic-Code: smtp; 550 no such user\r\n"
    raw = (
        b'Content-Type: multipart/report; report-type=delivery-status; boundary="Z"\r\n\r\n'
        b"--Z\r\nContent-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + base64.encodebytes(status).replace(b"\n", b"\r\n") + b"--Z\r\n"
        b"Content-Type: message/global-headers\r\n\r\nMessage-ID: <g@bridge.example>\r\n\r\n"
        b"--Z--\r\n"
    )
    dsn = parse_dsn(raw)
    assert dsn == Dsn(
        "g@bridge.example",
        [DsnRecipient("b@example.net", "failed", "5.1.1", "550 no such user")],
        "mx.example.org",
    )
    global_status = raw.replace(b"message/delivery-status", b"message/global-delivery-status")
    assert parse_dsn(global_status) == dsn


def test_original_id_from_the_report_itself_only_without_returned_headers() -> None:
    without_returned = EXIM_BOUNCE.split(b"--1715680862-eximdsn-846930886\r\nContent-type: text/r")
    raw = without_returned[0] + b"--1715680862-eximdsn-846930886--\r\n"
    dsn = parse_dsn(raw)
    assert dsn is not None and dsn.recipients
    assert dsn.original_message_id == "outgoing-42@bridge.example"  # the last References id
    raw = raw.replace(b"References:", b"In-Reply-To: <parent@bridge.example>\r\nReferences:")
    assert parse_dsn(raw).original_message_id == "parent@bridge.example"  # type: ignore[union-attr]
    # Returned headers without a Message-ID: the returned message is not ours to guess.
    no_id = EXIM_BOUNCE.replace(b"Message-ID: <outgoing-42@bridge.example>\r\n", b"")
    assert parse_dsn(no_id).original_message_id is None  # type: ignore[union-attr]


def test_untrusted_fields_are_cleaned() -> None:
    raw = MULTIPLE.replace(
        b"Diagnostic-Code: smtp; 250 2.0.0 OK",
        b"Diagnostic-Code: smtp; 250 ok\x00\x1b[31m" + b" spam" * 500,
    )
    dsn = parse_dsn(raw)
    assert dsn is not None
    diagnostic = dsn.recipients[2].diagnostic
    assert diagnostic is not None and diagnostic.startswith("250 ok [31m spam")
    assert len(diagnostic) <= 500 and diagnostic.endswith("…")
    assert not any(ord(ch) < 32 for ch in diagnostic)


NOT_REPORTS = [
    b"From: a@example.com\r\nSubject: hi\r\n\r\nplain mail\r\n",
    b"Content-Type: multipart/mixed; boundary=X\r\n\r\n--X\r\nContent-Type: message/"
    b"delivery-status\r\n\r\nFinal-Recipient: rfc822; b@x\r\nAction: failed\r\n--X--\r\n",
    # A read receipt is a report too, but not about delivery.
    POSTFIX_BOUNCE.replace(b"report-type=delivery-status", b"report-type=disposition-notification"),
    POSTFIX_BOUNCE.replace(b"report-type=delivery-status;", b""),
]


@pytest.mark.parametrize("raw", NOT_REPORTS)
def test_other_mail_is_not_a_dsn(raw: bytes) -> None:
    assert parse_dsn(raw) is None


GARBAGE = [
    b"",
    b"\x00\xff\xfe" * 300,
    bytes(range(256)) * 20,
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=",
    b"Content-Type: multipart/report; report-type=delivery-status\r\n\r\nno boundary",
    b"Content-Type: multipart/report; report-type=delivery-status; boundary=B\r\n\r\n--B\r\n"
    b"Content-Type: message/delivery-status\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!\r\n",
    b"".join(
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b%d\r\n"
        b"\r\n--b%d\r\n" % (n, n)
        for n in range(200)
    ),
    POSTFIX_BOUNCE[: len(POSTFIX_BOUNCE) // 2],
]


@pytest.mark.parametrize("raw", GARBAGE)
def test_garbage_never_raises(raw: bytes) -> None:
    dsn = parse_dsn(raw)
    assert dsn is None or (isinstance(dsn, Dsn) and isinstance(dsn.recipients, list))


def test_garbage_of_the_wrong_type_is_none() -> None:
    assert parse_dsn("not bytes") is None  # type: ignore[arg-type]
    assert parse_dsn(None) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rcpt", "line"),
    [
        (DsnRecipient("b@x", "failed", "5.1.1", None), "⚠ delivery to b@x failed: 5.1.1"),
        (DsnRecipient("b@x", "failed", "", None), "⚠ delivery to b@x failed"),
        (
            DsnRecipient("b@x", "delayed", "4.4.7", "timeout"),
            "⏳ delivery to b@x is delayed: timeout",
        ),
        (DsnRecipient("b@x", "expanded", "2.0.0", None), "↪ delivery to b@x was expanded: 2.0.0"),
        (DsnRecipient("b@x", "weird", "", None), "delivery to b@x: weird"),
        (DsnRecipient("", "failed", "", "x\r\ny"), "⚠ delivery to (unknown recipient) failed: x y"),
    ],
)
def test_describe(rcpt: DsnRecipient, line: str) -> None:
    assert describe(rcpt) == line


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    cut=st.integers(min_value=0, max_value=len(POSTFIX_BOUNCE)),
)
def test_mutated_reports_never_raise(data: st.DataObject, cut: int) -> None:
    source = data.draw(st.sampled_from([POSTFIX_BOUNCE, EXIM_BOUNCE, DELAYED, MULTIPLE]))
    noise = data.draw(st.binary(max_size=200))
    position = min(cut, len(source))
    dsn = parse_dsn(source[:position] + noise + source[position + len(noise) :])
    assert dsn is None or all(isinstance(r, DsnRecipient) for r in dsn.recipients)
    for rcpt in dsn.recipients if dsn else []:
        assert "\n" not in describe(rcpt) and "\r" not in describe(rcpt)
