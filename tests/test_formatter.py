"""The email → Matrix formatter: raw RFC 5322 bytes in, plain data out. No I/O anywhere."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest

from bridge.formatter import (
    Address,
    ParsedMail,
    others_line,
    parse_mail,
    render_message,
)
from bridge.formatter.from_email import (
    decode_bytes,
)
from bridge.formatter.quotes import collapse_plain_quotes
from bridge.formatter.to_matrix import MAX_SUBJECT_DISPLAY, PLACEHOLDER, display_subject

from .test_formatter_media import gif, jpeg, png, webp_vp8, webp_vp8l, webp_vp8x


def mail(headers: str, body: bytes | str = b"Hello.\n") -> bytes:
    """A message from header lines (one per line, "\\n"-separated) and a raw body, in CRLF."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    head = headers.strip("\n").replace("\n", "\r\n").encode("utf-8")
    return head + b"\r\n\r\n" + body.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def multipart(*parts: bytes, boundary: str = "BOUNDARY") -> bytes:
    """A multipart body; each part is its own headers and body, as `mail` builds them."""
    out = b""
    for part in parts:
        out += f"--{boundary}\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def part(headers: str, body: bytes | str) -> bytes:
    return mail(headers, body)


# --- bodies ---------------------------------------------------------------------------------------

HEAD = "From: Bob <bob@example.org>\nTo: alice@example.net\nSubject: Hi\nMessage-ID: <1@x>"


def test_plain_mail() -> None:
    parsed = parse_mail(mail(HEAD, "Hello Alice,\n\nsee you.\n"))
    assert parsed.text == "Hello Alice,\n\nsee you."
    assert parsed.html is None
    assert parsed.attachments == []
    assert parsed.problems == []
    assert parsed.from_ == Address("Bob", "bob@example.org")
    assert parsed.to == [Address("", "alice@example.net")]
    assert parsed.subject == "Hi"


def test_multipart_alternative_takes_text_and_html_from_their_parts() -> None:
    body = multipart(
        part("Content-Type: text/plain; charset=utf-8", "The *plain* version\n"),
        part("Content-Type: text/html; charset=utf-8", "<p>The <b>rich</b> version</p>"),
    )
    parsed = parse_mail(
        mail(HEAD + "\nContent-Type: multipart/alternative; boundary=BOUNDARY", body)
    )
    assert parsed.text == "The *plain* version"
    assert parsed.html == "<p>The <b>rich</b> version</p>"
    assert parsed.attachments == []


def test_html_only_mail_derives_text_with_line_breaks_and_links() -> None:
    html = (
        "<html><head><style>p{color:red}</style><title>Newsletter</title></head><body>"
        "<h1>News</h1><p>Read <a href='https://example.org/post'>the post</a>.<br>Bye</p>"
        "<ul><li>one</li><li>two</li></ul></body></html>"
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: text/html; charset=utf-8", html))
    assert parsed.text == "News\n\nRead the post (https://example.org/post).\nBye\n\n- one\n- two"
    assert parsed.html is not None and "<h1>News</h1>" in parsed.html
    assert "color:red" not in parsed.html and "Newsletter" not in parsed.text


@pytest.mark.parametrize(
    ("charset", "encoding", "body", "expected"),
    [
        ("utf-8", "8bit", "Grüße aus Köln – 😀".encode(), "Grüße aus Köln – 😀"),
        ("iso-8859-1", "8bit", "Grüße aus Köln".encode("latin-1"), "Grüße aus Köln"),
        ("windows-1252", "8bit", "“quoted” – €5".encode("cp1252"), "“quoted” – €5"),
        # Latin-1-labelled mail is usually windows-1252: 0x80 is the euro sign, not a control.
        ("iso-8859-1", "8bit", "€5".encode("cp1252"), "€5"),
        ("utf-8", "quoted-printable", b"Gr=C3=BC=C3=9Fe, soft=\n break", "Grüße, soft break"),
        ("utf-8", "base64", base64.encodebytes("Grüße".encode()), "Grüße"),
        ("x-unknown-charset", "8bit", "Grüße".encode(), "Grüße"),
        ("x-unknown-charset", "8bit", "Grüße".encode("latin-1"), "Grüße"),
        # Mislabelled: says ASCII, is UTF-8.
        ("us-ascii", "8bit", "naïve".encode(), "naïve"),
        # Codecs that are not charsets must not be applied to the body.
        ("base64", "8bit", b"aGVsbG8=", "aGVsbG8="),
        ("zlib", "8bit", b"plain", "plain"),
    ],
)
def test_body_charsets_and_transfer_encodings(
    charset: str, encoding: str, body: bytes, expected: str
) -> None:
    headers = (
        HEAD + f"\nContent-Type: text/plain; charset={charset}"
        f"\nContent-Transfer-Encoding: {encoding}"
    )
    parsed = parse_mail(mail(headers, body))
    assert parsed.text == expected


def test_format_flowed_is_unwrapped() -> None:
    body = "This line is \nsoft-wrapped.\n> quoted and \n> wrapped\n-- \nsig\n"
    headers = HEAD + "\nContent-Type: text/plain; charset=utf-8; format=flowed"
    parsed = parse_mail(mail(headers, body), collapse_quotes=False)
    assert parsed.text == "This line is soft-wrapped.\n> quoted and wrapped\n-- \nsig"


def test_mixed_body_parts_are_joined_in_order() -> None:
    body = multipart(
        part("Content-Type: text/plain", "First part."),
        part("Content-Type: text/plain", "-- \nList footer"),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "First part.\n\n-- \nList footer"


# --- headers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Grüße"),
        ("=?UTF-8?B?R3LDvMOfZQ==?=", "Grüße"),
        ("=?iso-8859-1?q?Gr=FC=DFe_aus_K=F6ln?=", "Grüße aus Köln"),
        ("Re: =?utf-8?q?Gr=C3=BC=C3=9Fe?= from Bob", "Re: Grüße from Bob"),
        # Folded: the whitespace between two encoded-words disappears.
        ("=?utf-8?q?one_?=\n =?utf-8?q?two?=", "one two"),
        ("=?utf-8?b?R3LD?=\n =?utf-8?b?vMOfZQ==?=", "Grüße"),  # "ü" split across words
        ("=?utf-8?q?caf=C3=A9?= =?iso-8859-1?q?_cr=E8me?=", "café crème"),
        ("Plain\n  folded   subject", "Plain folded subject"),
        ("=?x-unknown?q?caf=C3=A9?=", "café"),
        ("=?utf-8?b?not base64?=", "=?utf-8?b?not base64?="),
        ("Tab\tand\x01control", "Tab and control"),
    ],
)
def test_rfc2047_subjects(subject: str, expected: str) -> None:
    headers = f"From: bob@example.org\nSubject: {subject}"
    assert parse_mail(mail(headers)).subject == expected


def test_raw_utf8_headers_are_decoded() -> None:
    raw = mail("From: Jörg <joerg@example.de>\nSubject: Grüße")
    parsed = parse_mail(raw)
    assert parsed.subject == "Grüße"
    assert parsed.from_ == Address("Jörg", "joerg@example.de")


def test_missing_subject_is_empty() -> None:
    assert parse_mail(mail("From: bob@example.org")).subject == ""


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("From: =?utf-8?q?J=C3=B6rg?= <Joerg@Example.DE>", Address("Jörg", "Joerg@example.de")),
        (
            'From: "Bob, the Builder" <bob@example.org>',
            Address("Bob, the Builder", "bob@example.org"),
        ),
        ('From: "=?utf-8?q?J=C3=B6rg?=" <j@x.de>', Address("Jörg", "j@x.de")),
        ("From: bob@EXAMPLE.org (Bob)", Address("Bob", "bob@example.org")),
        ('From: "Bob" <not-an-address>', Address("Bob", "")),
        ("From: Just A Name", None),
        ("From: <>", None),
        ("From: ", None),
    ],
)
def test_from_addresses(header: str, expected: Address | None) -> None:
    assert parse_mail(mail(header)).from_ == expected


@pytest.mark.parametrize(
    ("headers", "field", "expected"),
    [
        ("Message-ID: <abc@example.org>", "message_id", "abc@example.org"),
        ("Message-ID:   <abc@example.org>  (comment)", "message_id", "abc@example.org"),
        ("Message-ID: abc@example.org", "message_id", "abc@example.org"),
        ("Message-ID: garbage", "message_id", None),
        ("Message-ID: <>", "message_id", None),
        ("Subject: no id", "message_id", None),
        ("In-Reply-To: <p@x>", "in_reply_to", ["p@x"]),
        ("In-Reply-To: <p@x> (Bob's message of Monday)", "in_reply_to", ["p@x"]),
        ("References: <a@x> <b@x>\n\t<c@x>", "references", ["a@x", "b@x", "c@x"]),
        ("References: <a@x> <a@x> <b@x>", "references", ["a@x", "b@x"]),
        ("References: <a@x>\nReferences: <b@x>", "references", ["a@x", "b@x"]),
        ("Subject: x", "references", []),
        ("List-Id: Friends of Cloakroom <Friends.Example.ORG>", "list_id", "friends.example.org"),
        ("List-Id: friends.example.org", "list_id", "friends.example.org"),
        ("List-Id: no list here", "list_id", None),
        ("Auto-Submitted: auto-replied", "auto_submitted", "auto-replied"),
        (
            "Auto-Submitted: Auto-Generated; owner-email=x@y",
            "auto_submitted",
            "auto-generated; owner-email=x@y",
        ),
        ("Auto-Submitted: no", "auto_submitted", None),
        ("Auto-Submitted: No ", "auto_submitted", None),
        ("Precedence: BULK", "precedence", "bulk"),
        ("Precedence: list", "precedence", "list"),
        ("Subject: x", "precedence", None),
    ],
)
def test_threading_and_list_headers(headers: str, field: str, expected: object) -> None:
    parsed = parse_mail(mail("From: bob@example.org\n" + headers))
    assert getattr(parsed, field) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Date: Mon, 1 Jan 2024 10:00:00 +0100", datetime(2024, 1, 1, 9, 0, tzinfo=UTC)),
        ("Date: Mon, 1 Jan 2024 10:00:00 -0000", datetime(2024, 1, 1, 10, 0, tzinfo=UTC)),
        ("Date: yesterday-ish", None),
        ("Date: Mon, 1 Jan 99999 10:00:00 +0000", None),
        ("Subject: none", None),
    ],
)
def test_dates(header: str, expected: datetime | None) -> None:
    assert parse_mail(mail("From: bob@example.org\n" + header)).date == expected


def test_participants_dedupe_keeps_order_and_fills_in_names() -> None:
    headers = (
        "From: bob@example.org\n"
        "To: Alice <alice@example.net>, Bob <BOB@Example.org>\n"
        "Cc: carol@example.com, alice@EXAMPLE.NET, Undisclosed:;\n"
        "Reply-To: list@example.com"
    )
    assert parse_mail(mail(headers)).participants() == [
        Address("Bob", "bob@example.org"),
        Address("Alice", "alice@example.net"),
        Address("", "carol@example.com"),
        Address("", "list@example.com"),
    ]


# --- attachments ----------------------------------------------------------------------------------


def attachment_part(content_type: str, data: bytes, extra: str = "") -> bytes:
    headers = f"Content-Type: {content_type}\nContent-Transfer-Encoding: base64" + extra
    return part(headers, base64.encodebytes(data))


@pytest.mark.parametrize(
    ("content_type", "data", "filename", "msgtype", "size"),
    [
        ("image/png", png(3, 2), "pic.png", "m.image", (3, 2)),
        ("image/gif", gif(5, 7), "anim.gif", "m.image", (5, 7)),
        ("image/jpeg", jpeg(640, 480), "photo.jpg", "m.image", (640, 480)),
        ("image/jpeg", jpeg(17, 9, sof=0xC2), "progressive.jpg", "m.image", (17, 9)),
        ("image/webp", webp_vp8x(300, 200), "a.webp", "m.image", (300, 200)),
        ("image/webp", webp_vp8l(33, 44), "b.webp", "m.image", (33, 44)),
        ("image/webp", webp_vp8(12, 34), "c.webp", "m.image", (12, 34)),
        ("image/png", b"not a png at all", "broken.png", "m.image", None),
        # An SVG can carry script: a file, and no dimensions read.
        ("image/svg+xml", b"<svg width='10' height='10'/>", "logo.svg", "m.file", None),
        ("video/mp4", b"\x00\x00\x00\x18ftypmp42", "clip.mp4", "m.video", None),
        ("audio/mpeg", b"ID3\x03\x00", "song.mp3", "m.audio", None),
        ("application/pdf", b"%PDF-1.4", "doc.pdf", "m.file", None),
        # A PNG sent as octet-stream is still a file: the msgtype follows the declared type.
        ("application/octet-stream", png(3, 2), "x.png", "m.file", None),
    ],
)
def test_attachments_msgtype_and_dimensions(
    content_type: str, data: bytes, filename: str, msgtype: str, size: tuple[int, int] | None
) -> None:
    body = multipart(
        part("Content-Type: text/plain", "See attached."),
        attachment_part(
            f'{content_type}; name="{filename}"',
            data,
            f'\nContent-Disposition: attachment; filename="{filename}"',
        ),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "See attached."
    [attachment] = parsed.attachments
    assert attachment.filename == filename
    assert attachment.content_type == content_type
    assert attachment.data == data
    assert attachment.msgtype == msgtype
    assert (attachment.width, attachment.height) == (size or (None, None))
    assert attachment.inline is False


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        # RFC 2231 with charset and language, as Thunderbird sends it.
        (
            "attachment; filename*=UTF-8''Gr%C3%BC%C3%9Fe%20aus%20K%C3%B6ln.pdf",
            "Grüße aus Köln.pdf",
        ),
        # RFC 2231 continuations.
        ("attachment; filename*0*=UTF-8''Gr%C3%BC; filename*1*=%C3%9Fe.pdf", "Grüße.pdf"),
        # RFC 2047 inside the quoted parameter: wrong by the book, common in practice.
        ('attachment; filename="=?utf-8?q?Gr=C3=BC=C3=9Fe.pdf?="', "Grüße.pdf"),
        ('attachment; filename="../../etc/passwd"', "passwd"),
        ("attachment", "attachment.pdf"),
    ],
)
def test_attachment_filenames_from_headers(disposition: str, expected: str) -> None:
    body = multipart(
        part("Content-Type: text/plain", "x"),
        attachment_part("application/pdf", b"%PDF", f"\nContent-Disposition: {disposition}"),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert [a.filename for a in parsed.attachments] == [expected]


def test_inline_cid_image_is_marked_inline_and_dropped_from_the_html() -> None:
    related = multipart(
        part("Content-Type: text/html", '<p>Logo: <img src="cid:logo@x" alt="logo"></p>'),
        attachment_part("image/png", png(4, 4), "\nContent-ID: <logo@x>"),
        attachment_part("image/gif", gif(1, 1), "\nContent-ID: <unused@x>"),
        boundary="REL",
    )
    body = multipart(
        part("Content-Type: text/plain", "Logo: [logo]"),
        part("Content-Type: multipart/related; boundary=REL", related),
    )
    headers = HEAD + "\nContent-Type: multipart/alternative; boundary=BOUNDARY"
    parsed = parse_mail(mail(headers, body))
    assert parsed.text == "Logo: [logo]"
    assert parsed.html == "<p>Logo: </p>"
    logo, unused = parsed.attachments
    assert (logo.content_id, logo.inline, logo.msgtype, logo.filename) == (
        "logo@x",
        True,
        "m.image",
        "image.png",
    )
    assert (unused.content_id, unused.inline) == ("unused@x", False)


def test_disposition_inline_marks_inline() -> None:
    body = multipart(
        part("Content-Type: text/plain", "x"),
        attachment_part("image/png", png(1, 1), "\nContent-Disposition: inline"),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert [a.inline for a in parsed.attachments] == [True]


def test_message_rfc822_becomes_an_eml_attachment() -> None:
    inner = mail(
        "From: carol@example.com\nSubject: =?utf-8?q?Original_=C3=BCber?=\nMessage-ID: <in@x>",
        "The forwarded text.\n",
    )
    body = multipart(
        part("Content-Type: text/plain", "Forwarding this."),
        part("Content-Type: message/rfc822", inner),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "Forwarding this."
    [eml] = parsed.attachments
    assert (eml.filename, eml.content_type, eml.msgtype) == (
        "Original über.eml",
        "message/rfc822",
        "m.file",
    )
    assert b"The forwarded text." in eml.data and b"Message-ID: <in@x>" in eml.data
    assert parse_mail(eml.data).text == "The forwarded text."


def test_calendar_in_alternative_becomes_an_attachment() -> None:
    body = multipart(
        part("Content-Type: text/plain", "Invitation: lunch"),
        part("Content-Type: text/html", "<p>Invitation: <b>lunch</b></p>"),
        part("Content-Type: text/calendar; method=REQUEST", "BEGIN:VCALENDAR\nEND:VCALENDAR\n"),
        part("Content-Type: text/x-amp-html", "<html amp4email>AMP</html>"),
    )
    parsed = parse_mail(
        mail(HEAD + "\nContent-Type: multipart/alternative; boundary=BOUNDARY", body)
    )
    assert parsed.text == "Invitation: lunch"
    assert [(a.filename, a.content_type) for a in parsed.attachments] == [
        ("invite.ics", "text/calendar")
    ]


def test_inline_text_part_with_a_filename_is_text() -> None:
    # Apple Mail and others name the text parts they send inline: the text of the mail.
    body = multipart(
        part("Content-Type: text/plain", "Body."),
        part('Content-Type: text/plain\nContent-Disposition: inline; filename="notes.txt"', "N"),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "Body.\n\nN"
    assert parsed.attachments == []


@pytest.mark.parametrize(
    "headers",
    [
        'Content-Type: text/plain\nContent-Disposition: attachment; filename="notes.txt"',
        'Content-Type: text/plain; name="notes.txt"\nContent-Disposition: attachment',
        'Content-Type: text/html\nContent-Disposition: inline; filename="notes.txt"',
    ],
)
def test_text_part_as_a_file_is_an_attachment(headers: str) -> None:
    body = multipart(part("Content-Type: text/plain", "Body."), part(headers, "N"))
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "Body."
    assert [(a.filename, a.data) for a in parsed.attachments] == [("notes.txt", b"N")]


# --- damaged mail -------------------------------------------------------------------------------


def test_broken_base64_attachment_is_noted_and_the_text_survives() -> None:
    body = multipart(
        part("Content-Type: text/plain", "The text."),
        part(
            "Content-Type: application/pdf\nContent-Transfer-Encoding: base64",
            "JVBERi0xLjQK!!!@@@ this is ### not base64 ***\nJVBERi0x",
        ),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "The text."
    assert parsed.problems == [
        "Part 3 (application/pdf) may be damaged: its base64 encoding is broken"
    ]
    assert [a.content_type for a in parsed.attachments] == ["application/pdf"]


def test_broken_base64_text_part_shows_what_decodes() -> None:
    body = multipart(
        part("Content-Type: text/plain\nContent-Transfer-Encoding: base64", "SGVsbG8*&^%$#\nx"),
        part("Content-Type: text/plain", "The second part."),
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body))
    assert parsed.text == "Hello\n\nThe second part."
    assert parsed.problems == [
        "Part 2 (text/plain) is damaged; the text before the damage is shown"
    ]


@pytest.mark.parametrize(
    ("encoded", "text"),
    [
        # A list server's footer appended to a base64 body, as mail clients show it.
        (base64.encodebytes("Grüße aus Köln\n".encode()) + b"-- \nList footer\n", "Grüße aus Köln"),
        (b"SGVsbG8gd29ybGQ=\n!!!junk", "Hello world"),
        (b"SGVsbG8gd29ybGQ=\nSGVsbG8=", "Hello world"),  # data after the padding
    ],
)
def test_base64_with_trailing_junk(encoded: bytes, text: str) -> None:
    headers = HEAD + "\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64"
    parsed = parse_mail(mail(headers, encoded))
    assert parsed.text == text
    assert parsed.problems == [
        "Part 1 (text/plain) is damaged; the text before the damage is shown"
    ]


def test_base64_that_decodes_to_nothing_is_noted() -> None:
    headers = HEAD + "\nContent-Type: text/plain\nContent-Transfer-Encoding: base64"
    parsed = parse_mail(mail(headers, "!!! not base64 at all"))
    assert (parsed.text, parsed.problems) == ("", ["Part 1 (text/plain) could not be decoded"])


def test_missing_padding_is_not_damage() -> None:
    headers = HEAD + "\nContent-Type: text/plain\nContent-Transfer-Encoding: base64"
    parsed = parse_mail(mail(headers, "SGVsbG8"))
    assert (parsed.text, parsed.problems) == ("Hello", [])


def test_wrong_boundary_is_guessed() -> None:
    body = multipart(
        part("Content-Type: text/plain", "Found anyway."),
        attachment_part("application/pdf", b"%PDF"),
        boundary="ACTUAL",
    )
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed; boundary=DECLARED", body))
    assert parsed.text == "Found anyway."
    assert [a.data for a in parsed.attachments] == [b"%PDF"]
    assert parsed.problems == [
        "Part 1 (multipart/mixed) has a wrong boundary; its parts were guessed"
    ]


def test_multipart_without_boundary_is_shown_as_text() -> None:
    parsed = parse_mail(mail(HEAD + "\nContent-Type: multipart/mixed", "Just some text.\n"))
    assert parsed.text == "Just some text."
    assert parsed.problems == ["Part 1 (multipart/mixed) has no usable boundary; shown as text"]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff\xfe",
        b"no headers at all",
        b"Subject: " + b"x" * 200_000 + b"\r\n\r\nbody",
        b"From: " + b"<a@b>, " * 20_000 + b"\r\n\r\nbody",
        b'Content-Type: text/plain; charset="\r\n\r\nbody',
        b"Content-Type: ;;;===\r\nContent-Transfer-Encoding: base64\r\n\r\n====",
    ],
)
def test_garbage_never_raises(raw: bytes) -> None:
    parsed = parse_mail(raw)
    assert isinstance(parsed, ParsedMail)
    assert render_message(parsed, root=True).body


# --- quote collapsing ---------------------------------------------------------------------------

PLAIN_QUOTES = [
    # (original, collapsed)
    ("Thanks!\n\nOn Mon, 1 Jan 2024, Bob <b@x> wrote:\n> old\n> stuff\n", "Thanks!"),
    (
        "Thanks!\nOn Mon, 1 Jan 2024 at 10:00, Bob Example <\nbob@example.org> wrote:\n\n> old",
        "Thanks!",
    ),
    ("Danke!\n\nAm 01.01.2024 um 10:00 schrieb Bob <b@x>:\n> alt", "Danke!"),
    ("Merci !\n\nLe lun. 1 janv. 2024 à 10:00, Bob <b@x> a écrit :\n> vieux", "Merci !"),
    ("No attribution.\n\n> just a quote\n>\n> more\n\n", "No attribution."),
    ("Yes.\n\n-----Original Message-----\nFrom: Bob\nSent: Monday\n\nold body", "Yes."),
    ("Yes.\n\n________________________________\nFrom: Bob <b@x>\nSent: Monday\n\nold", "Yes."),
    ("Reply.\n-- \nBob's signature\n\nOn Mon, Bob wrote:\n> old", "Reply.\n-- \nBob's signature"),
    # Interleaved (inline) replies keep their quotes.
    (
        "> question one\nanswer one\n> question two\nanswer two\n",
        "> question one\nanswer one\n> question two\nanswer two\n",
    ),
    # ...and only the trailing rest of the original goes.
    ("> q1\na1\n\n> rest of\n> the original\n", "> q1\na1"),
    # Nothing but a quote: keep it rather than send nothing.
    ("On Mon, Bob wrote:\n> everything\n", "On Mon, Bob wrote:\n> everything\n"),
    (
        "-----Original Message-----\nFrom: Bob\n\nold",
        "-----Original Message-----\nFrom: Bob\n\nold",
    ),
    ("No quote here.\nBob wrote: nothing", "No quote here.\nBob wrote: nothing"),
]


@pytest.mark.parametrize(("original", "expected"), PLAIN_QUOTES)
def test_plain_quote_collapsing(original: str, expected: str) -> None:
    assert collapse_plain_quotes(original) == expected


@pytest.mark.parametrize(("original", "expected"), PLAIN_QUOTES)
def test_collapse_quotes_false_keeps_everything(original: str, expected: str) -> None:
    raw = mail(HEAD + "\nContent-Type: text/plain; charset=utf-8", original)
    assert parse_mail(raw, collapse_quotes=False).text == original.rstrip()
    assert parse_mail(raw).text == expected.rstrip()


HTML_QUOTES = [
    # Apple Mail
    (
        "<div>Thanks!</div><div><br></div><div>On 1 Jan 2024, at 10:00, Bob &lt;b@x&gt; wrote:"
        '<br></div><blockquote type="cite"><div>old</div></blockquote>',
        "<div>Thanks!</div>",
    ),
    # Thunderbird
    (
        '<p>Sure</p><div class="moz-cite-prefix">On 01.01.24 10:00, Bob wrote:<br></div>'
        '<blockquote type="cite">old</blockquote><br>',
        "<p>Sure</p>",
    ),
    # Gmail
    (
        '<div dir="ltr">Yes</div><br><div class="gmail_quote"><div dir="ltr" class="gmail_attr">'
        'On Mon, Bob &lt;b@x&gt; wrote:<br></div><blockquote class="gmail_quote" style="margin:0">'
        "old</blockquote></div>",
        "<div>Yes</div>",
    ),
    # Outlook: everything from the reply header to the end is the original.
    (
        '<div>Yes</div><div id="appendonsend"></div><hr style="display:inline-block">'
        '<div id="divRplyFwdMsg"><b>From:</b> Bob</div><div>old body</div>',
        "<div>Yes</div>",
    ),
    ("<p>Yes</p><p>-----Original Message-----<br>From: Bob</p><p>old</p>", "<p>Yes</p>"),
    # Interleaved: kept.
    (
        '<blockquote type="cite">q1</blockquote><p>a1</p><blockquote type="cite">q2</blockquote>'
        "<p>a2</p>",
        "<blockquote>q1</blockquote><p>a1</p><blockquote>q2</blockquote><p>a2</p>",
    ),
    # Interleaved, then the rest of the original at the end: only that goes.
    (
        '<blockquote type="cite">q1</blockquote><p>a1</p><blockquote type="cite">rest</blockquote>',
        "<blockquote>q1</blockquote><p>a1</p>",
    ),
    # Only a quote: kept.
    ('<blockquote type="cite">all quote</blockquote>', "<blockquote>all quote</blockquote>"),
    # A plain blockquote (no cite marker) is content, not a reply quote.
    (
        "<p>As the poet said:</p><blockquote>verse</blockquote>",
        "<p>As the poet said:</p><blockquote>verse</blockquote>",
    ),
]


@pytest.mark.parametrize(("original", "expected"), HTML_QUOTES)
def test_html_quote_collapsing(original: str, expected: str) -> None:
    raw = mail(HEAD + "\nContent-Type: text/html; charset=utf-8", original)
    assert parse_mail(raw).html == expected


def test_html_collapse_quotes_false_keeps_the_quote() -> None:
    original, _ = HTML_QUOTES[0]
    raw = mail(HEAD + "\nContent-Type: text/html; charset=utf-8", original)
    parsed = parse_mail(raw, collapse_quotes=False)
    assert parsed.html is not None and "<blockquote>" in parsed.html and "old" in parsed.html
    assert parsed.text.endswith("> old")


def test_forwards_keep_their_quoted_content() -> None:
    headers = HEAD.replace("Subject: Hi", "Subject: Fwd: the plan")
    original = "See below.\n\n-----Original Message-----\nFrom: Carol\n\nThe plan."
    assert parse_mail(mail(headers, original)).text == original


# --- render_message -------------------------------------------------------------------------------


def parsed_mail(**fields: object) -> ParsedMail:
    return ParsedMail(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "root", "body", "formatted"),
    [
        (
            {"subject": "Lunch", "text": "At noon?"},
            True,
            "Lunch\n\nAt noon?",
            "<strong>Lunch</strong><br><br>At noon?",
        ),
        ({"subject": "Lunch", "text": "At noon?"}, False, "At noon?", None),
        (
            {"subject": "A <b> & c", "text": "1 < 2\nnext"},
            True,
            "A <b> & c\n\n1 < 2\nnext",
            "<strong>A &lt;b&gt; &amp; c</strong><br><br>1 &lt; 2<br>next",
        ),
        (
            {"subject": "Lunch", "text": "At noon?", "html": "<p>At <b>noon</b>?</p>"},
            True,
            "Lunch\n\nAt noon?",
            "<strong>Lunch</strong><br><br><p>At <b>noon</b>?</p>",
        ),
        (
            {"subject": "Lunch", "text": "At noon?", "html": "<p>At <b>noon</b>?</p>"},
            False,
            "At noon?",
            "<p>At <b>noon</b>?</p>",
        ),
        ({"subject": "", "text": "Untitled"}, True, "Untitled", None),
        (
            {"subject": "Only a subject", "text": ""},
            True,
            f"Only a subject\n\n{PLACEHOLDER}",
            f"<strong>Only a subject</strong><br><br>{PLACEHOLDER}",
        ),
        ({"subject": "", "text": "  \n"}, False, PLACEHOLDER, None),
        # HTML that shows nothing is not worth sending.
        ({"subject": "", "text": "", "html": "<p> </p>"}, False, PLACEHOLDER, None),
    ],
)
def test_render_message(
    fields: dict[str, object], root: bool, body: str, formatted: str | None
) -> None:
    content = render_message(parsed_mail(**fields), root=root)
    assert (content.body, content.formatted_body, content.truncated) == (body, formatted, False)


@pytest.mark.parametrize("html", [None, "<p>" + "<b>bold</b> ünïcödé " * 20_000 + "</p>"])
def test_render_message_truncates_to_fit_an_event(html: str | None) -> None:
    mail_ = parsed_mail(subject="Big", text="ünïcödé text " * 50_000, html=html)
    content = render_message(mail_, root=True, budget=40_000)
    assert content.truncated
    size = len(content.body.encode("unicode_escape")) + len(
        (content.formatted_body or "").encode("unicode_escape")
    )
    assert size <= 40_000
    assert content.body.startswith("Big\n\nünïcödé text") and content.body.endswith("truncated)")
    if html is not None:
        assert content.formatted_body is not None
        assert content.formatted_body.startswith("<strong>Big</strong><br><br><p><b>bold</b>")
        assert content.formatted_body.endswith("</p><p><em>(message truncated)</em></p>")


@pytest.mark.parametrize(
    ("data", "charset", "expected"),
    [
        (b"caf\xc3\xa9", "utf-8", "café"),
        (b"caf\xe9", "utf-8", "café"),  # mislabelled Latin-1
        (b"caf\xe9", None, "café"),
        # Bytes windows-1252 leaves undefined: replaced, not passed on as C1 control characters.
        (b"ok \x81\x8d", "windows-1252", "ok \ufffd\ufffd"),
        (b"caf\xc3\xa9", '"UTF-8"', "café"),
        (b"\xa4", "iso-8859-15", "€"),
        (b"caf\xc3\xa9", "rot13", "café"),
    ],
)
def test_decode_bytes(data: bytes, charset: str | None, expected: str) -> None:
    assert decode_bytes(data, charset) == expected


def test_long_subject_is_shortened_in_the_event_only() -> None:
    subject = "word " * 2000  # 10,000 characters
    parsed = parse_mail(mail(f"From: bob@example.org\nSubject: {subject}", "The body."))
    assert parsed.subject == subject.strip()  # kept whole for threading and replies
    content = render_message(parsed, root=True)
    heading, body = content.body.split("\n\n")
    assert body == "The body." and not content.truncated
    assert len(heading) <= MAX_SUBJECT_DISPLAY and heading.endswith("word…")
    assert content.formatted_body is not None
    assert content.formatted_body.endswith("</strong><br><br>The body.")


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("short", "short"),
        ("x" * MAX_SUBJECT_DISPLAY, "x" * MAX_SUBJECT_DISPLAY),
        ("x" * (MAX_SUBJECT_DISPLAY + 1), "x" * (MAX_SUBJECT_DISPLAY - 1) + "…"),
        ("ab " * 200, ("ab " * 100).strip() + "…"),
    ],
)
def test_display_subject(subject: str, expected: str) -> None:
    assert display_subject(subject) == expected


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (0, ""),
        (1, "Also on this mail: P0 <p0@x>"),
        (2, "Also on this mail: P0 <p0@x> and p1@x"),
        (3, "Also on this mail: P0 <p0@x>, p1@x and P2 <p2@x>"),
        (
            11,
            "Also on this mail: P0 <p0@x>, p1@x, "
            + ", ".join(f"P{n} <p{n}@x>" if n % 2 == 0 else f"p{n}@x" for n in range(2, 10))
            + " and 1 other",
        ),
        (2000, None),
    ],
)
def test_others_line(count: int, expected: str | None) -> None:
    people = [Address(f"P{n}" if n % 2 == 0 else "", f"p{n}@x") for n in range(count)]
    line = others_line(people)
    if expected is None:
        assert line.endswith(" and 1,990 others") and line.count("@") == 10
    else:
        assert line == expected
