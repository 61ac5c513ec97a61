"""Composing outbound mail from Matrix messages: header injection, addresses, threading, bodies,
attachments, and a property test over arbitrary text."""

from __future__ import annotations

import email
import email.policy
import hashlib
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.formatter import (
    OutgoingAttachment,
    OutgoingMail,
    compose,
    matrix_body_to_text,
    matrix_html_to_email_html,
    new_message_id,
    reply_subject,
    to_email,
)


def _mail(**changes: object) -> OutgoingMail:
    mail = OutgoingMail(
        from_name="Alice",
        from_address="alice@bridge.example",
        to=[("Bob", "bob@example.com")],
        cc=[],
        subject="Plans",
        message_id="own-1@bridge.example",
        in_reply_to=None,
        references=[],
        body="Hello",
        formatted_body=None,
        attachments=[],
    )
    return replace(mail, **changes)


def _parse(raw: bytes) -> EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def _parts(message: EmailMessage) -> tuple[str, str]:
    """(text/plain, text/html) content of the body."""
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    return tuple(p.get_content().replace("\r\n", "\n") for p in (plain, html))


def _header_lines(raw: bytes) -> list[bytes]:
    """Every header line of every header block, continuation lines included."""
    lines = []
    in_head = True
    for line in raw.split(b"\r\n"):
        if in_head and not line:
            in_head = False
        elif in_head:
            lines.append(line)
        elif line.startswith(b"--"):
            in_head = True
    return lines


# --- header injection ------------------------------------------------------------------------

INJECTIONS = [
    "\r\nBcc: evil@x",
    "\nX-Injected: 1",
    "\rX-Injected: 1",
    "\r\n\r\nX-Injected: 1",
    "\r\n X-Injected: 1",
    "\x00X-Injected: 1",
    "\u2028X-Injected: 1",
    "\u2029Bcc: evil@x",
    "\x85X-Injected: 1",
    "\x0bX-Injected: 1",
    "\x0cBcc: evil@x",
    "\x1cX-Injected: 1",
    "\x1eBcc: evil@x",
    # Encoded-words the email package would decode into a line break when folding.
    "=?utf-8?q?=0D=0ABcc:_evil@x?=",
    "=?utf-8?b?DQpYLUluamVjdGVkOiAx?=",
    " =?us-ascii?q?a?= =?utf-8?q?=0AX-Injected=3A_1?=",
]
_BREAKS = re.compile(r"[\r\n\x00\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _expected(text: str) -> str:
    """What a header keeps of `text`: breaks as spaces, whitespace collapsed, no "=?"."""
    return " ".join(_BREAKS.sub(" ", text).split()).replace("=?", "= ?")


def _assert_not_injected(raw: bytes) -> EmailMessage:
    message = _parse(raw)
    for part in message.walk():
        assert part["Bcc"] is None and part["X-Injected"] is None
    for line in _header_lines(raw):
        assert not re.match(rb"(?i)(bcc|x-injected)\s*:", line), line
    for name in ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version"):
        assert len(message.get_all(name) or []) == 1, name
    return message


@pytest.mark.parametrize("payload", INJECTIONS)
def test_display_names_cannot_inject_headers(payload: str) -> None:
    mail = _mail(
        from_name=f"Alice{payload}",
        to=[(f"Bob{payload}", "bob@example.com")],
        cc=[(f"Carol{payload}", "carol@example.com")],
    )
    message = _assert_not_injected(compose(mail))
    assert message["From"].addresses[0].display_name == _expected(f"Alice{payload}")
    assert message["From"].addresses[0].addr_spec == "alice@bridge.example"
    (to,) = message["To"].addresses
    assert (to.display_name, to.addr_spec) == (_expected(f"Bob{payload}"), "bob@example.com")
    (cc,) = message["Cc"].addresses
    assert (cc.display_name, cc.addr_spec) == (_expected(f"Carol{payload}"), "carol@example.com")


@pytest.mark.parametrize("payload", INJECTIONS)
def test_subjects_cannot_inject_headers(payload: str) -> None:
    message = _assert_not_injected(compose(_mail(subject=f"Plans{payload}")))
    assert str(message["Subject"]) == _expected(f"Plans{payload}")


@pytest.mark.parametrize("payload", INJECTIONS)
def test_filenames_cannot_inject_headers(payload: str) -> None:
    attachment = OutgoingAttachment(f"report{payload}.pdf", "application/pdf", b"%PDF-1.4")
    message = _assert_not_injected(compose(_mail(attachments=[attachment])))
    (part,) = message.iter_attachments()
    assert part.get_content_type() == "application/pdf"
    assert set(part.keys()) == {"Content-Type", "Content-Transfer-Encoding", "Content-Disposition"}
    filename = part.get_filename()
    assert filename and filename.startswith("report") and filename.endswith(".pdf")
    assert not _BREAKS.search(filename) and "/" not in filename
    assert part.get_content() == b"%PDF-1.4"


@pytest.mark.parametrize("payload", INJECTIONS)
def test_extra_header_values_cannot_inject_headers(payload: str) -> None:
    mail = _mail(extra_headers={"Auto-Submitted": f"auto-generated{payload}"})
    message = _assert_not_injected(compose(mail))
    # The stdlib may fold the whole value onto a continuation line and keep the leading space.
    values = [value.strip() for value in message.get_all("Auto-Submitted")]
    assert values == [_expected(f"auto-generated{payload}")]


def test_path_separators_and_controls_leave_filenames() -> None:
    attachments = [
        OutgoingAttachment("../../etc/passwd", "text/plain", b"x"),
        OutgoingAttachment("C:\\Windows\\evil.exe", "application/octet-stream", b"x"),
        OutgoingAttachment("a\tb\x07c.txt", "text/plain", b"x"),
        OutgoingAttachment("", "image/png", b"x"),
        OutgoingAttachment("invoice\u202egnp.exe", "application/octet-stream", b"x"),
    ]
    message = _parse(compose(_mail(attachments=attachments)))
    names = [part.get_filename() for part in message.iter_attachments()]
    assert names == ["passwd", "evil.exe", "a b c.txt", "image.png", "invoicegnp.exe"]


@pytest.mark.parametrize(
    "name",
    [
        "x" * 80 + ", evil@attacker.example,",
        "Long Name " * 10 + ": group; evil@attacker.example",
        '"' * 90 + "<evil@attacker.example>",
        "Zoë " * 40 + ", evil@attacker.example",
    ],
)
def test_long_display_names_stay_one_mailbox(name: str) -> None:
    """Python 3.11's folder drops the quotes around a long display name; the text after a
    comma in it would become an address of its own."""
    raw = compose(_mail(from_name=name, to=[(name, "bob@example.com"), ("", "c@example.com")]))
    assert all(len(line) <= 78 for line in _header_lines(raw) if b"Message-ID" not in line)
    message = _parse(raw)
    assert [a.addr_spec for a in message["From"].addresses] == ["alice@bridge.example"]
    assert [a.addr_spec for a in message["To"].addresses] == ["bob@example.com", "c@example.com"]
    # Python's parser puts a space between adjacent encoded-words that RFC 2047 drops.
    shown = message["To"].addresses[0].display_name
    assert shown.replace(" ", "") == _expected(name).replace(" ", "")


def test_encoded_word_text_stays_literal() -> None:
    message = _parse(compose(_mail(from_name="=?utf-8?b?Qm9i?=", subject="x=?y?q?z?=")))
    assert message["From"].addresses[0].display_name == "= ?utf-8?b?Qm9i?="
    assert str(message["Subject"]) == "x= ?y?q?z?="


def test_output_check_catches_what_cleaning_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the "=?" rule, the stdlib (before 3.11.10/3.12.5) writes a decoded line break
    into the header; the final check, or the stdlib's own, must refuse the mail."""
    cleaner = to_email.header_text

    def without_encoded_word_rule(text: str, limit: int) -> str:
        return cleaner(text, limit).replace("= ?", "=?")

    monkeypatch.setattr(to_email, "header_text", without_encoded_word_rule)
    with pytest.raises(ValueError):
        compose(_mail(subject="=?utf-8?q?x=0D=0ABcc:_evil@x?="))


# --- addresses -------------------------------------------------------------------------------

INVALID_ADDRESSES = [
    "",
    "bob",
    "@example.com",
    "bob@",
    "bob@@example.com",
    "bob@example.com@evil.example",
    "bob@example.com\r\nBcc: evil@x",
    "bob@example.com\nBcc: evil@x",
    "bob@example.com\x00",
    "bob@example.com\u2028",
    "bob @example.com",
    "bob@exa mple.com",
    " bob@example.com",
    "<bob@example.com>",
    "Bob <bob@example.com>",
    "bob@example.com, eve@example.com",
    "bob@example.com;eve@example.com",
    ".bob@example.com",
    "bob.@example.com",
    "bob..smith@example.com",
    '"bob smith"@example.com',
    "bob(comment)@example.com",
    "bøb@example.com",
    "bob@exämple.com",
    "bob@-example.com",
    "bob@example-.com",
    "bob@example..com",
    "bob@[192.0.2.1]",
    "a" * 65 + "@example.com",
    "bob@" + "a" * 250 + ".com",
]


@pytest.mark.parametrize("address", INVALID_ADDRESSES)
@pytest.mark.parametrize("field", ["from", "to", "cc"])
def test_invalid_addresses_raise(field: str, address: str) -> None:
    changes: dict[str, object] = {
        "from": {"from_address": address},
        "to": {"to": [("Bob", "bob@example.com"), ("Eve", address)]},
        "cc": {"cc": [("Eve", address)]},
    }[field]
    with pytest.raises(ValueError):
        compose(_mail(**changes))


@pytest.mark.parametrize(
    "address",
    [
        "bob@example.com",
        "Bob.Smith+tag@mail.example.co.uk",
        "o'brien@example.ie",
        "x_y-z=1@localhost",
        "#!$%&'*+-/=?^_`{}|~@example.org",
    ],
)
def test_valid_addresses_round_trip(address: str) -> None:
    message = _parse(compose(_mail(to=[("", address)], cc=[("Same", address)])))
    assert [a.addr_spec for a in message["To"].addresses] == [address]
    assert [a.addr_spec for a in message["Cc"].addresses] == [address]


def test_several_recipients_and_no_cc_header_when_empty() -> None:
    to = [("Bob", "bob@example.com"), ("", "carol@example.org"), ("Dan, Jr.", "dan@example.net")]
    message = _parse(compose(_mail(to=to)))
    assert [(a.display_name, a.addr_spec) for a in message["To"].addresses] == to
    assert message["Cc"] is None


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("message id", {"message_id": ""}),
        ("message id", {"message_id": "no-at-sign"}),
        ("message id", {"message_id": "a b@example.com"}),
        ("message id", {"message_id": "a\r\nBcc: x@example.com"}),
        ("extra header", {"extra_headers": {"Bcc": "evil@x"}}),
        ("extra header", {"extra_headers": {"from": "evil@x"}}),
        ("extra header", {"extra_headers": {"Content-Type": "text/html"}}),
        ("extra header", {"extra_headers": {"X Bad": "1"}}),
        ("extra header", {"extra_headers": {"X:Bad": "1"}}),
        ("extra header", {"extra_headers": {"X-A\r\nBcc": "evil@x"}}),
        ("extra header", {"extra_headers": {"": "1"}}),
    ],
)
def test_invalid_ids_and_extra_header_names_raise(name: str, changes: dict) -> None:
    with pytest.raises(ValueError):
        compose(_mail(**changes))


# --- threading -------------------------------------------------------------------------------


def test_message_id_and_threading_headers() -> None:
    raw = compose(
        _mail(
            in_reply_to="parent@example.com",
            references=["root@example.com", "middle@example.com", "parent@example.com"],
        )
    )
    message = _parse(raw)
    assert message["Message-ID"] == "<own-1@bridge.example>"
    assert message["In-Reply-To"] == "<parent@example.com>"
    assert message["References"].split() == [
        "<root@example.com>",
        "<middle@example.com>",
        "<parent@example.com>",
    ]
    assert b"\r\nIn-Reply-To: <parent@example.com>\r\n" in raw


def test_no_threading_headers_for_a_new_conversation() -> None:
    message = _parse(compose(_mail()))
    assert message["In-Reply-To"] is None and message["References"] is None


def test_references_deduplicated_capped_and_ending_with_the_parent() -> None:
    ids = [f"id{n}@example.com" for n in range(40)]
    references = ids[:30] + ["id3@example.com", "bad id@x", "<id31@example.com>", "x\ny@z"]
    message = _parse(compose(_mail(in_reply_to="id39@example.com", references=references)))
    found = [value.strip("<>") for value in message["References"].split()]
    # The root, then the most recent ancestors; the parent was missing, so it was added last.
    assert found == ["id0@example.com", *ids[13:30], "id31@example.com", "id39@example.com"]
    assert len(found) == to_email.MAX_REFERENCES


def test_long_ids_are_folded_between_ids_never_encoded() -> None:
    ids = [f"{'x' * 120}.{n}@example.com" for n in range(5)]
    raw = compose(_mail(in_reply_to=ids[-1], references=ids, message_id=ids[0]))
    assert b"=?" not in raw.split(b"\r\n\r\n", 1)[0]
    message = _parse(raw)
    assert message["References"].split() == [f"<{value}>" for value in ids]
    assert message["In-Reply-To"] == f"<{ids[-1]}>"


def test_invalid_parent_is_dropped_not_fatal() -> None:
    message = _parse(compose(_mail(in_reply_to="has space@example.com", references=[])))
    assert message["In-Reply-To"] is None and message["References"] is None


# --- subjects and ids ------------------------------------------------------------------------

REPLY_SUBJECTS = [
    ("Plans", "Re: Plans"),
    ("Re: Plans", "Re: Plans"),
    ("RE: Plans", "Re: Plans"),
    ("re:Plans", "Re: Plans"),
    ("Re: Re: Re: Plans", "Re: Plans"),
    ("Aw: Plans", "Re: Plans"),
    ("AW: Re: Plans", "Re: Plans"),
    ("Sv: Planer", "Re: Planer"),
    ("Antw: Plannen", "Re: Plannen"),
    ("Re[2]: Plans", "Re: Plans"),
    ("Re (3): Plans", "Re: Plans"),
    ("回复：计划", "Re: 计划"),
    ("Fwd: Plans", "Re: Fwd: Plans"),
    ("Re: Fwd: Plans", "Re: Fwd: Plans"),
    ("Regarding: Plans", "Re: Regarding: Plans"),
    ("Reply needed", "Re: Reply needed"),
    ("Are: we there", "Re: Are: we there"),
    ("  Plans  ", "Re: Plans"),
    ("Plans\r\nBcc: evil@x", "Re: Plans Bcc: evil@x"),
    ("", "(no subject)"),
    ("   ", "(no subject)"),
    ("Re:", "(no subject)"),
    ("RE: re: ", "(no subject)"),
]


@pytest.mark.parametrize(("subject", "expected"), REPLY_SUBJECTS)
def test_reply_subject(subject: str, expected: str) -> None:
    assert reply_subject(subject) == expected


def test_new_message_ids_are_unique_and_unguessable() -> None:
    ids = {new_message_id("bridge.example") for _ in range(2000)}
    assert len(ids) == 2000
    for value in ids:
        token, at, domain = value.partition("@")
        assert at and domain == "bridge.example"
        assert re.fullmatch(r"[A-Za-z0-9_-]{32,}", token)
    # Usable as the Message-ID as they are.
    message = _parse(compose(_mail(message_id=ids.pop())))
    assert message["Message-ID"].startswith("<") and message["Message-ID"].endswith(">")


@pytest.mark.parametrize("domain", ["", "a b", "example.com\r\n", "exa_mple.com", "x@y", "ü.de"])
def test_new_message_id_refuses_odd_domains(domain: str) -> None:
    with pytest.raises(ValueError):
        new_message_id(domain)


# --- bodies ----------------------------------------------------------------------------------

MENTION = '<a href="https://matrix.to/#/@alice:example.org">Alice</a>'


@pytest.mark.parametrize(
    ("formatted", "html", "text"),
    [
        (f"{MENTION}: look at this", "Alice: look at this", "Alice: look at this"),
        (
            '<a href="https://matrix.to/#/%40bob%3Aexample.org">Bob</a>, hi',
            "Bob, hi",
            "Bob, hi",
        ),
        ('<a href="matrix:u/carol:example.org">Carol</a> hi', "Carol hi", "Carol hi"),
        (
            f"<p>{MENTION} and <strong>bold</strong></p>",
            "<p>Alice and <strong>bold</strong></p>",
            "Alice and bold",
        ),
        (
            '<a href="https://matrix.to/#/#room:example.org">#room</a>',
            '<a href="https://matrix.to/#/#room:example.org" rel="noopener">#room</a>',
            "#room (https://matrix.to/#/#room:example.org)",
        ),
        (
            '<a href="https://example.com/x">site</a>',
            '<a href="https://example.com/x" rel="noopener">site</a>',
            "site (https://example.com/x)",
        ),
        ('<img data-mx-emoticon src="mxc://example.org/cat" alt=":cat:"> meow', ":cat: meow", None),
        ('<img src="https://tracker.example/pixel.png" alt="x">hi', "hi", "hi"),
        ("<p>hi</p><script>alert(1)</script>", "<p>hi</p>", "hi"),
    ],
)
def test_matrix_html_becomes_email_html(formatted: str, html: str, text: str | None) -> None:
    assert matrix_html_to_email_html(formatted) == html
    assert matrix_body_to_text("ignored", formatted) == (text or ":cat: meow")


def test_mentions_become_names_in_both_parts() -> None:
    mail = _mail(body="Alice: look", formatted_body=f"{MENTION}: look")
    plain, html = _parts(_parse(compose(mail)))
    assert plain.strip() == "Alice: look"
    assert html.strip() == "Alice: look"
    assert "matrix.to" not in plain + html


REPLY_HTML = (
    "<mx-reply><blockquote>"
    '<a href="https://matrix.to/#/!room:example.org/$event">In reply to</a> '
    '<a href="https://matrix.to/#/@bob:example.org">@bob:example.org</a>'
    "<br>the secret original</blockquote></mx-reply>"
)
REPLY_BODY = "> <@bob:example.org> the secret original\n> second line\n\nmy answer"


@pytest.mark.parametrize(
    "formatted",
    [
        f"{REPLY_HTML}my answer",
        f"{REPLY_HTML.upper().replace('HTTPS://MATRIX.TO/#/', 'https://matrix.to/#/')}my answer",
        f"<mx-reply>outer {REPLY_HTML} the secret original</mx-reply>my answer",
        "<mx-reply data-x='1'><blockquote>the secret original</blockquote></mx-reply >my answer",
    ],
)
def test_mx_reply_is_removed(formatted: str) -> None:
    assert matrix_html_to_email_html(formatted) == "my answer"
    plain, html = _parts(_parse(compose(_mail(body=REPLY_BODY, formatted_body=formatted))))
    assert "secret" not in plain + html
    assert plain.strip() == "my answer" and html.strip() == "my answer"


def test_unclosed_mx_reply_keeps_the_message() -> None:
    assert matrix_html_to_email_html("<mx-reply>kept text") == "kept text"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (REPLY_BODY, "my answer"),
        ("> * <@bob:example.org> waves\n\nhi back", "hi back"),
        ("> <@bob:example.org> one line only\nno blank line", "no blank line"),
        # Not a fallback: an ordinary quote the user typed stays.
        ("> quoted by hand\n\nmy text", "> quoted by hand\n\nmy text"),
        ("my text\n> <@bob:example.org> later", "my text\n> <@bob:example.org> later"),
        ("plain\r\nwith\rbreaks\x00", "plain\nwith\nbreaks"),
    ],
)
def test_plain_reply_fallback_is_removed(body: str, expected: str) -> None:
    assert matrix_body_to_text(body, None) == expected
    plain, _ = _parts(_parse(compose(_mail(body=body))))
    assert plain.rstrip("\n") == expected


def test_plain_only_body_is_escaped_into_html() -> None:
    body = "<b>not bold</b> & <script>alert(1)</script>\nsecond line"
    plain, html = _parts(_parse(compose(_mail(body=body, formatted_body=None))))
    assert plain.rstrip("\n") == body
    assert html.rstrip("\n") == (
        "&lt;b&gt;not bold&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;<br>second line"
    )


def test_empty_formatted_text_falls_back_to_body() -> None:
    formatted = "<mx-reply>only a fallback</mx-reply>"
    assert matrix_body_to_text("the <body>", formatted) == "the <body>"
    plain, html = _parts(_parse(compose(_mail(body="the <body>", formatted_body=formatted))))
    assert (plain.strip(), html.strip()) == ("the <body>", "the &lt;body&gt;")


def test_names_of_only_controls_leave_a_bare_address() -> None:
    raw = compose(_mail(from_name="\u2028\r\n\x00", to=[("\u202e", "bob@example.com")]))
    assert b"\r\nFrom: alice@bridge.example\r\n" in b"\r\n" + raw
    assert b"\r\nTo: bob@example.com\r\n" in raw


def test_structure_without_and_with_attachments() -> None:
    message = _parse(compose(_mail()))
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    attachment = OutgoingAttachment("a.txt", "text/plain", b"a")
    message = _parse(compose(_mail(attachments=[attachment])))
    assert message.get_content_type() == "multipart/mixed"
    kinds = [p.get_content_type() for p in message.iter_parts()]
    assert kinds == ["multipart/alternative", "text/plain"]
    assert [p.get_content_disposition() for p in message.iter_parts()] == [None, "attachment"]
    for part in message.walk():
        assert (part["MIME-Version"] is not None) == (part is message)
        if part.get_content_maintype() == "text" and not part.get_filename():
            assert part.get_content_charset() == "utf-8"


def test_long_lines_and_non_ascii_are_encoded_crlf_and_short() -> None:
    body = "word " * 2000 + "\n" + "ü" * 3000 + "\n" + "x" * 5000
    for formatted in (None, f"<p>{body}</p>"):
        raw = compose(_mail(body=body, formatted_body=formatted, subject="s" * 2000))
        assert raw.isascii()
        assert raw.count(b"\n") == raw.count(b"\r\n")
        assert max(len(line) for line in raw.split(b"\r\n")) <= 998
        message = _parse(raw)
        assert str(message["Subject"]) == "s" * to_email.MAX_SUBJECT_CHARS
    plain, html = _parts(_parse(compose(_mail(body=body))))
    assert plain.rstrip("\n") == body
    assert html.rstrip("\n") == body.replace("\n", "<br>")


def test_non_ascii_names_subject_and_filename_round_trip() -> None:
    mail = _mail(
        from_name="Zoë Ångström 日本",
        to=[("Renée Ø'Brien, Jr.", "renee@example.com")],
        subject="Grüße — 你好 🎉 " + "long " * 30,
        body="Ünïcødé body 🎉",
        attachments=[OutgoingAttachment("Überweisung – März 😀.pdf", "application/pdf", b"1")],
    )
    raw = compose(mail)
    assert raw.isascii()
    assert b"filename*=" in raw or b"filename*0*=" in raw  # RFC 2231
    message = _parse(raw)
    assert message["From"].addresses[0].display_name == "Zoë Ångström 日本"
    assert message["To"].addresses[0].display_name == "Renée Ø'Brien, Jr."
    assert str(message["Subject"]) == ("Grüße — 你好 🎉 " + "long " * 30).strip()
    (part,) = message.iter_attachments()
    assert part.get_filename() == "Überweisung – März 😀.pdf"
    assert _parts(message)[0].rstrip("\n") == "Ünïcødé body 🎉"


def test_attachment_bytes_round_trip() -> None:
    blobs = [bytes(range(256)) * 500 + b"\r\n\x00\r", b"", b"plain text\n", b"\xff" * 77]
    attachments = [
        OutgoingAttachment("blob.bin", "application/octet-stream", blobs[0]),
        OutgoingAttachment("empty.dat", "application/x-empty", blobs[1]),
        OutgoingAttachment("note.txt", "text/plain", blobs[2]),
        OutgoingAttachment("mail.eml", "message/rfc822", blobs[3]),
    ]
    message = _parse(compose(_mail(attachments=attachments)))
    parts = list(message.iter_attachments())
    assert [p.get_filename() for p in parts] == ["blob.bin", "empty.dat", "note.txt", "mail.eml"]
    assert [p.get_content_type() for p in parts] == [
        "application/octet-stream",
        "application/x-empty",
        "text/plain",
        "application/octet-stream",  # message/* may not be base64
    ]
    for part, blob in zip(parts, blobs, strict=True):
        data = part.get_payload(decode=True)
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(blob).hexdigest()


@pytest.mark.parametrize("content_type", ["", "nonsense", "text/plain; charset=x\r\nBcc: x", "A/B"])
def test_odd_content_types_become_octet_stream(content_type: str) -> None:
    attachment = OutgoingAttachment("f", content_type, b"x")
    message = _assert_not_injected(compose(_mail(attachments=[attachment])))
    (part,) = message.iter_attachments()
    expected = "a/b" if content_type == "A/B" else "application/octet-stream"
    expected = "text/plain" if content_type.startswith("text/plain") else expected
    assert part.get_content_type() == expected


def test_date_defaults_to_now_in_utc_and_naive_means_utc() -> None:
    message = _parse(compose(_mail()))
    sent = message["Date"].datetime
    assert sent.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - sent) < timedelta(minutes=1)
    naive = datetime(2024, 5, 1, 12, 30)
    assert _parse(compose(_mail(date=naive)))["Date"] == "Wed, 01 May 2024 12:30:00 +0000"
    aware = datetime(2024, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    assert _parse(compose(_mail(date=aware)))["Date"].datetime == aware


def test_extra_headers_and_header_order() -> None:
    raw = compose(
        _mail(
            cc=[("", "carol@example.com")],
            in_reply_to="p@x",
            extra_headers={"Auto-Submitted": "auto-generated", "X-Empty": " \r\n "},
        )
    )
    head = raw.split(b"\r\n\r\n", 1)[0].decode()
    names = [line.split(":", 1)[0] for line in head.split("\r\n") if not line[0].isspace()]
    assert names == [
        "From",
        "To",
        "Cc",
        "Subject",
        "Date",
        "Message-ID",
        "In-Reply-To",
        "References",
        "Auto-Submitted",
        "MIME-Version",
        "Content-Type",
    ]
    assert _parse(raw)["Auto-Submitted"] == "auto-generated"


def test_empty_subject_and_body_still_compose() -> None:
    message = _parse(compose(_mail(subject="", body="", from_name="")))
    assert message.get_all("Subject") == [""]
    assert message["From"] == "alice@bridge.example"
    assert _parts(message) == ("\n", "\n")


def test_lone_surrogates_do_not_break_composition() -> None:
    mail = _mail(
        from_name="A\udc80", subject="S\ud800", body="B\udfff", formatted_body="<p>\udc00</p>"
    )
    mail.attachments = [OutgoingAttachment("f\udc80.txt", "text/plain", b"x")]
    message = _assert_not_injected(compose(mail))
    assert message["From"].addresses[0].display_name == "A?"


# --- property test ---------------------------------------------------------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_ATEXT = "abcxyzABCXYZ0189!#$%&'*+-/=?^_`{|}~"
_LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
ADDRESSES = st.builds(
    lambda words, labels: ".".join(words) + "@" + ".".join(labels),
    st.lists(st.text(_ATEXT, min_size=1, max_size=12), min_size=1, max_size=3),
    st.lists(_LABEL, min_size=1, max_size=3),
)
# Any code point, surrogates and controls included, mixed with the known attacks.
ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=300)
UNTRUSTED = st.one_of(
    ANY_TEXT,
    st.lists(st.one_of(ANY_TEXT, st.sampled_from(INJECTIONS)), max_size=6).map("".join),
)


@FUZZ
@given(
    from_name=UNTRUSTED,
    from_address=ADDRESSES,
    to=st.lists(st.tuples(UNTRUSTED, ADDRESSES), min_size=1, max_size=4),
    cc=st.lists(st.tuples(UNTRUSTED, ADDRESSES), max_size=3),
    subject=UNTRUSTED,
    body=UNTRUSTED,
    formatted=st.none() | UNTRUSTED,
    filenames=st.lists(UNTRUSTED, max_size=3),
    extra=UNTRUSTED,
    references=st.lists(UNTRUSTED, max_size=4),
)
def test_compose_never_lets_text_become_headers(
    from_name: str,
    from_address: str,
    to: list[tuple[str, str]],
    cc: list[tuple[str, str]],
    subject: str,
    body: str,
    formatted: str | None,
    filenames: list[str],
    extra: str,
    references: list[str],
) -> None:
    mail = _mail(
        from_name=from_name,
        from_address=from_address,
        to=to,
        cc=cc,
        subject=subject,
        body=body,
        formatted_body=formatted,
        attachments=[OutgoingAttachment(name, "application/pdf", b"%PDF") for name in filenames],
        extra_headers={"X-Extra": extra},
        references=references,
        in_reply_to=references[-1] if references else None,
    )
    raw = compose(mail)
    assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    message = _assert_not_injected(raw)
    allowed = {"from", "to", "cc", "subject", "date", "message-id", "in-reply-to", "references"}
    allowed |= {"x-extra", "mime-version", "content-type"}
    assert {name.lower() for name in message.keys()} <= allowed
    for part in list(message.walk())[1:]:
        names = {name.lower() for name in part.keys()}
        assert names <= {"content-type", "content-transfer-encoding", "content-disposition"}
    assert message["From"].addresses[0].addr_spec == from_address
    assert [a.addr_spec for a in message["To"].addresses] == [address for _, address in to]
    assert [a.addr_spec for a in (message["Cc"].addresses if cc else ())] == [a for _, a in cc]
    assert not _BREAKS.search(str(message["Subject"]))
    assert len(list(message.iter_attachments())) == len(filenames)
