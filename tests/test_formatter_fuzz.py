"""Property tests: `parse_mail` and `render_message` never raise, return well-typed data, never
let script through and produce output within a constant factor of their input, for generated MIME
trees, corrupted ones, deeply nested HTML and plain random bytes. And the linear MIME parser reads
exactly what the stdlib's reads."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import html as html_lib
import quopri
import re
from datetime import datetime

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bridge.formatter import (
    Address,
    Attachment,
    MatrixContent,
    ParsedMail,
    parse_mail,
    render_message,
)
from bridge.formatter.html import sanitize_html
from bridge.formatter.mime import parse_bytes
from bridge.formatter.to_matrix import EVENT_BUDGET

FUZZ = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CHARSETS = [
    "utf-8",
    "UTF-8",
    "iso-8859-1",
    "windows-1252",
    "us-ascii",
    "utf-16",
    "utf-7",
    "shift_jis",
    "koi8-r",
    "x-unknown",
    "unknown-8bit",
    "zlib",
    "base64",
    "rot13",
    "idna",
    "",
    '"utf-8',
]
ENCODINGS = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "bogus", ""]
LEAF_TYPES = [
    "text/plain",
    "text/html",
    "text/calendar",
    "text/x-amp-html",
    "image/png",
    "image/gif",
    "image/svg+xml",
    "application/pdf",
    "application/octet-stream",
    "message/rfc822",
    "message/delivery-status",
    "audio/ogg",
    "video/mp4",
    "garbage",
    "text/",
    "",
]
MULTIPART_TYPES = [
    "multipart/mixed",
    "multipart/alternative",
    "multipart/related",
    "multipart/signed",
    "multipart/digest",
    "multipart/report",
    "multipart/x-unknown",
]
DISPOSITIONS = [
    "",
    "inline",
    "attachment",
    'attachment; filename="../../etc/passwd"',
    "attachment; filename*=UTF-8''%E2%82%AC%20rate.txt",
    'inline; filename="=?utf-8?q?a=C3=A4?="',
    "attachment; filename*0*=UTF-8''a%; filename*1=b",
    'attachment; filename="a\\"b\\\\c"',
    "attachment; filename=",
    "attachment;;;;=",
]
HTML_SNIPPETS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//x.example/x.js></SCRIPT>",
    "<style>*{}</style>",
    '<a href="javascript:alert(1)">x</a>',
    '<a href="JAVASCRIPT:alert(1)">x</a>',
    '<a href="java&#10;script:alert(1)">x</a>',
    '<a href=" javascript:alert(1)">x</a>',
    '<img src="cid:a@b" onerror="alert(1)">',
    "<img src=x onerror=alert(1)>",
    '<blockquote type="cite">quoted</blockquote>',
    '<div class="gmail_quote">q</div>',
    '<div id="divRplyFwdMsg">From: x</div>',
    "<p>On Mon, Bob wrote:</p>",
    "<br>",
    "<hr>",
    '<a href="https://example.org">link</a>',
    "<table><tr><td>cell",
    "</div></p></a>",
    "<svg><script>alert(1)</script></svg>",
    "<iframe src=javascript:alert(1)>",
    "<math><style><img src=x onerror=alert(1)></style></math>",
    "<!-- comment -->",
    "&lt;&#0;",
]
HEADER_VALUES = [
    "=?utf-8?q?caf=C3=A9?=",
    "=?utf-8?b?w6k=?=",
    "=?bogus?q?x?=",
    "=?utf-8?b?!!!?=",
    "<a@b>",
    "<a@b> <c@d>",
    "Bob <bob@example.org>",
    '"A, B" <ab@x>, c@d',
    "undisclosed-recipients:;",
    "Mon, 1 Jan 2024 10:00:00 +0000",
    "Thu, 31 Dec 99999 99:99:99 +9999",
    "<",
    ">",
    "",
    "no",
]
HEADER_NAMES = [
    "From",
    "To",
    "Cc",
    "Reply-To",
    "Sender",
    "Subject",
    "Message-ID",
    "In-Reply-To",
    "References",
    "List-Id",
    "Auto-Submitted",
    "Precedence",
    "Date",
    "Content-ID",
]

header_value = st.one_of(
    st.sampled_from(HEADER_VALUES),
    st.text(max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


@st.composite
def header_lines(draw: st.DrawFn, names: list[str]) -> bytes:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(names))
        value = draw(header_value).replace("\r", " ").replace("\n", " ")
        if draw(st.booleans()):
            value = value.replace(" ", "\r\n ", 1)  # folded
        lines.append(f"{name}: {value}".encode("utf-8", "surrogateescape"))
    return b"\r\n".join(lines)


def encode(body: bytes, cte: str, correctly: bool) -> bytes:
    if not correctly:
        return body
    if cte == "base64":
        return base64.encodebytes(body)
    if cte == "quoted-printable":
        return quopri.encodestring(body)
    return body


@st.composite
def leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from(LEAF_TYPES))
    charset = draw(st.sampled_from(CHARSETS))
    cte = draw(st.sampled_from(ENCODINGS))
    body = draw(
        st.one_of(
            st.binary(max_size=200),
            st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
            st.lists(st.sampled_from(HTML_SNIPPETS), max_size=6).map(lambda s: "".join(s).encode()),
        )
    )
    lines = [f"Content-Type: {ctype}; charset={charset}; format=flowed".encode()]
    if cte:
        lines.append(f"Content-Transfer-Encoding: {cte}".encode())
    disposition = draw(st.sampled_from(DISPOSITIONS))
    if disposition:
        lines.append(f"Content-Disposition: {disposition}".encode())
    extra = draw(header_lines(["Content-ID", "Content-Type", "Content-Transfer-Encoding"]))
    head = b"\r\n".join(lines + ([extra] if extra else []))
    return head + b"\r\n\r\n" + encode(body, cte, draw(st.booleans()))


@st.composite
def multipart(draw: st.DrawFn, children: st.SearchStrategy[bytes]) -> bytes:
    parts = draw(st.lists(children, max_size=4))
    boundary = draw(st.sampled_from(["b1", "=_NextPart_0", "a'()+_,-./:=?", "x" * 70]))
    declared = draw(st.sampled_from([boundary, boundary, "", "other"]))
    ctype = draw(st.sampled_from(MULTIPART_TYPES))
    head = f'Content-Type: {ctype}; boundary="{declared}"'.encode()
    body = draw(st.sampled_from([b"", b"This is a MIME message.\r\n"]))
    for part in parts:
        body += f"--{boundary}\r\n".encode() + part + b"\r\n"
    if draw(st.booleans()):
        body += f"--{boundary}--\r\n".encode()
    return head + b"\r\n\r\n" + body


mime_tree = st.recursive(leaf(), lambda children: multipart(children), max_leaves=10)


@st.composite
def message(draw: st.DrawFn) -> bytes:
    top = draw(header_lines(HEADER_NAMES))
    tree = draw(mime_tree)
    return (top + b"\r\n" if top else b"") + tree


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(message()))
    for _ in range(draw(st.integers(1, 5))):
        at = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["insert", "delete", "truncate"]))
        if action == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del raw[at : at + draw(st.integers(1, 16))]
        else:
            del raw[at:]
    return bytes(raw)


any_mail = st.one_of(message(), corrupted(), st.binary(max_size=2000))


def assert_address(value: object) -> None:
    assert isinstance(value, Address)
    assert isinstance(value.name, str) and isinstance(value.address, str)
    assert "\n" not in value.name and "\r" not in value.name


def assert_well_typed(mail: ParsedMail) -> None:
    assert isinstance(mail, ParsedMail)
    assert mail.message_id is None or (isinstance(mail.message_id, str) and mail.message_id)
    for ids in (mail.in_reply_to, mail.references):
        assert isinstance(ids, list) and all(isinstance(i, str) and i for i in ids)
    assert isinstance(mail.subject, str) and "\n" not in mail.subject
    for single in (mail.from_, mail.sender):
        if single is not None:
            assert_address(single)
    for many in (mail.reply_to, mail.to, mail.cc, mail.participants()):
        assert isinstance(many, list)
        for entry in many:
            assert_address(entry)
    for optional in (mail.list_id, mail.auto_submitted, mail.precedence):
        assert optional is None or isinstance(optional, str)
    assert mail.date is None or (isinstance(mail.date, datetime) and mail.date.tzinfo)
    assert isinstance(mail.text, str)
    assert mail.html is None or isinstance(mail.html, str)
    assert all(isinstance(p, str) and p for p in mail.problems)
    for attachment in mail.attachments:
        assert_attachment(attachment)


def assert_attachment(attachment: Attachment) -> None:
    assert isinstance(attachment, Attachment)
    name = attachment.filename
    assert isinstance(name, str) and name and not name.startswith(".")
    assert not re.search(r"[/\\\x00-\x1f\x7f]", name)
    assert len(name.encode("utf-8")) <= 255
    assert re.fullmatch(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+", attachment.content_type)
    assert isinstance(attachment.data, bytes)
    assert attachment.content_id is None or isinstance(attachment.content_id, str)
    assert isinstance(attachment.inline, bool)
    assert attachment.msgtype in ("m.image", "m.video", "m.audio", "m.file")
    if attachment.msgtype != "m.image":
        assert attachment.width is None and attachment.height is None
    for size in (attachment.width, attachment.height):
        assert size is None or (isinstance(size, int) and size > 0)


def assert_no_script(html: str) -> None:
    lowered = html.lower()
    assert "<script" not in lowered
    # "javascript:" may be visible text (a plain-text mail quoting HTML is escaped, not run), so
    # the check is on the tags. nh3 escapes "<" and ">" in attribute values: a tag ends at ">".
    for tag in re.findall(r"<[^>]*>", lowered):
        decoded = html_lib.unescape(tag)
        assert "javascript:" not in decoded
        assert not re.search(r"\son[a-z]+\s*=", decoded)
        assert not re.search(r'\ssrc="(?!mxc://)', decoded)


@FUZZ
@given(raw=any_mail, collapse=st.booleans())
def test_parse_and_render_never_raise(raw: bytes, collapse: bool) -> None:
    mail = parse_mail(raw, collapse_quotes=collapse)
    assert_well_typed(mail)
    if mail.html is not None:
        assert_no_script(mail.html)
    for root in (True, False):
        content = render_message(mail, root=root)
        assert isinstance(content, MatrixContent)
        assert isinstance(content.body, str) and content.body.strip()
        if content.formatted_body is not None:
            assert isinstance(content.formatted_body, str)
            assert_no_script(content.formatted_body)


html_soup = st.lists(
    st.one_of(
        st.sampled_from(HTML_SNIPPETS),
        st.sampled_from(["<", ">", '"', "'", "=", "&", "#", ";", "/", " ", "script", "on"]),
        st.text(alphabet="<>/=\"' abcjsvrpt:&#;x0123456789", max_size=20),
    ),
    max_size=30,
).map("".join)


@FUZZ
@given(html=html_soup)
def test_sanitize_html_never_lets_script_through(html: str) -> None:
    cleaned = sanitize_html(html)
    assert_no_script(cleaned)
    if "javascript:" not in html_lib.unescape(re.sub(r"<[^>]*>", "", html)).lower():
        # Nor as text, unless the input had it as text: it never leaks out of a tag.
        assert "javascript:" not in html_lib.unescape(cleaned).lower()


# --- output stays within a constant factor of the input ----------------------------------------

# Text from HTML: a 4-byte "<br>" may start a line with the capped quote prefix (41 characters);
# HTML from text escapes each character into at most 6 ("&quot;"). Far below any quadratic growth.
SIZE_FACTOR = 64
SIZE_SLACK = 8_192  # problem notes, placeholders, the subject line


def assert_linear_output(raw: bytes, mail: ParsedMail) -> None:
    produced = len(mail.text) + len(mail.html or "") + sum(len(p) for p in mail.problems)
    assert produced <= SIZE_FACTOR * len(raw) + SIZE_SLACK
    # Each attachment is a part of the mail, and the original at most once more.
    assert sum(len(a.data) for a in mail.attachments) <= 2 * len(raw) + SIZE_SLACK


@FUZZ
@given(raw=any_mail, collapse=st.booleans())
def test_output_size_is_linear_in_input_size(raw: bytes, collapse: bool) -> None:
    assert_linear_output(raw, parse_mail(raw, collapse_quotes=collapse))


NESTING_TAGS = ["blockquote", "ul", "ol", "li", "div", "p", "pre", "a", "b", "table", "td"]


@st.composite
def deep_html(draw: st.DrawFn) -> str:
    """Nesting up to far past MAX_HTML_DEPTH, with a line at each level: where the old converter's
    output grew with depth × lines (past ~1,000 levels of quotes, more than SIZE_FACTOR)."""
    depth = draw(st.integers(1, 3000))
    tags = draw(st.lists(st.sampled_from(NESTING_TAGS), min_size=1, max_size=4))
    line = draw(st.sampled_from(["x<br>", "<br>", "t", "<p>p</p>", '<a href="https://e.x">l</a>']))
    opened = "".join(f"<{tags[i % len(tags)]}>{line}" for i in range(depth))
    closed = "".join(f"</{tags[i % len(tags)]}>" for i in reversed(range(depth)))
    return opened + (closed if draw(st.booleans()) else "")


@settings(FUZZ, max_examples=60)
@given(html=deep_html(), collapse=st.booleans())
@example(html="<blockquote>x<br>" * 2000, collapse=True)  # the old converter: 18 MB of text
@example(html="<ul><li>x<br>" * 2000 + "</li></ul>" * 2000, collapse=False)
def test_deep_html_output_is_linear(html: str, collapse: bool) -> None:
    raw = b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()
    mail = parse_mail(raw, collapse_quotes=collapse)
    assert_linear_output(raw, mail)
    for root in (True, False):
        content = render_message(mail, root=root)
        assert len(content.body) + len(content.formatted_body or "") <= 2 * EVENT_BUDGET


# --- mime.parse_bytes reads exactly what the stdlib parser reads -------------------------------

BOUNDARIES = ["b", "b-", "b--", "a.b", "x" * 70, "=_Part_1", "sp ace"]


@st.composite
def nested_multipart(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Multiparts that reuse boundaries across levels, close them or not, and put delimiter-like
    lines ("--b--x", "--b \t", "--b-") in bodies: where outer delimiters end inner parts."""
    if depth >= 6 or draw(st.booleans()):
        body = draw(
            st.lists(
                st.sampled_from(
                    ["text", "--b", "--b--", "--b \t", "--b-", "--b--x", "--", "", "-- sig"]
                ),
                max_size=5,
            )
        )
        return b"Content-Type: text/plain\r\n\r\n" + "\r\n".join(body).encode()
    boundary = draw(st.sampled_from(BOUNDARIES))
    children = draw(st.lists(nested_multipart(depth + 1), max_size=3))
    out = f'Content-Type: multipart/mixed; boundary="{boundary}"\r\n\r\npreamble\r\n'.encode()
    ending = draw(st.sampled_from(["\r\n", "\n", " \r\n", "\t\r\n", ""]))
    for child in children:
        out += f"--{boundary}{ending}".encode() + child + b"\r\n"
    if draw(st.booleans()):
        out += f"--{boundary}--{ending}epilogue\r\n".encode()
    return out


def structure(message: email.message.Message) -> list[object]:
    return [
        (
            part.get_content_type(),
            part._payload if isinstance(part._payload, str) else len(part._payload),
            part.preamble,
            part.epilogue,
            [type(d).__name__ for d in part.defects],
        )
        for part in message.walk()
    ]


@FUZZ
@given(raw=st.one_of(any_mail, nested_multipart().map(lambda b: b"Subject: x\r\n" + b)))
def test_linear_parser_reads_what_the_stdlib_reads(raw: bytes) -> None:
    expected = email.message_from_bytes(raw, policy=email.policy.compat32)
    assert structure(parse_bytes(raw)) == structure(expected)
