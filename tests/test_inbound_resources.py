"""What the worst mails cost to parse and render, against a plain mail of the same size; and
the limits that stop them, each with a readable note.

Every bound is a ratio measured in the same run, never an absolute time, so that a loaded
machine slows both sides alike. CPU time (process_time) rather than wall time: other processes
on the machine do not count. Peak memory is traced in a separate run (tracemalloc slows
allocation-heavy code unevenly). The bounds are loose enough for a busy 2-core machine and far
below what the quadratic code did. CPU seconds and peak traced memory on 2026-12-04, the code
before this test → now (the plain mail of the same size in brackets):

    deep HTML, 3,000 quote levels (156 KB):  11.7 s, 287 MB → 0.20 s, 4.2 MB  (0.07 s, 3.1 MB)
    deep HTML, 5,000 levels (260 KB):        33 s, 763 MB   → 0.30 s, 6.9 MB  (0.11 s, 5.2 MB)
    5,000 parts (524 KB):                    0.89 s         → 0.14 s          (0.03 s)
    100 MIME levels, 300,000 lines (3.9 MB): not read (the text lost, the mail attached whole)
                                             → 0.25 s, 25 MB (0.08 s, 12 MB); the stdlib parser
                                             alone took 12 s for 1M lines at that depth
    20 MB of base64 zeros (27 MB):           1.1 s, 209 MB  → 0.7 s, 128 MB   (0.34 s, 79 MB)
"""

from __future__ import annotations

import base64
import gc
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from bridge.formatter import Address, from_email, parse_mail, render_message
from bridge.formatter.from_email import MAX_ATTACHMENTS, MAX_DEPTH, MAX_PARTS, TOO_DEEP, WHOLE

from .test_formatter import HEAD as SHORT_HEAD
from .test_formatter import attachment_part, mail, multipart, part

HEAD = (
    b"From: Bob <bob@example.org>\r\nTo: alice@example.net\r\nSubject: Hi\r\n"
    b"Message-ID: <1@example.org>\r\n"
)


def html_mail(html: str) -> bytes:
    return HEAD + b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html.encode()


def deep_html(levels: int) -> bytes:
    """A quote in a quote in a quote…, a line at each level: quadratic for a converter that
    writes the "> " prefix per level on every line."""
    opened = "".join(f"<blockquote>line {n:05d} of the quote<br>" for n in range(levels))
    return html_mail(opened + "</blockquote>" * levels)


def deep_lists(levels: int) -> bytes:
    return html_mail("<ul><li>item<br>" * levels + "</li></ul>" * levels)


def deep_mime(levels: int, filler_lines: int) -> bytes:
    body = b"Content-Type: text/plain\r\n\r\ndeep text\r\n" + b"filler line\r\n" * filler_lines
    for level in reversed(range(levels)):
        head = f"Content-Type: multipart/mixed; boundary=b{level}\r\n\r\n--b{level}\r\n"
        body = head.encode() + body + f"\r\n--b{level}--\r\n".encode()
    return HEAD + body


def many_parts(count: int) -> bytes:
    out = [b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"]
    out.append(b"--B\r\nContent-Type: text/plain\r\n\r\nBody.\r\n")
    for n in range(count):
        out.append(
            b"--B\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="f%d.bin"\r\n\r\nx\r\n' % n
        )
    return HEAD + b"".join(out) + b"--B--\r\n"


def huge_headers() -> bytes:
    """A 10,000-character subject and 2,000 recipients: legal (Postfix takes 100 KB a header)."""
    people = [f'"Person {n}" <person.{n}@example.org>' for n in range(2000)]
    return (
        b"From: Bob <bob@example.org>\r\nSubject: "
        + b"word " * 2000
        + b"\r\nTo: "
        + ", ".join(people[:1000]).encode()
        + b"\r\nCc: "
        + ", ".join(people[1000:]).encode()
        + b"\r\n\r\nThe body.\r\n"
    )


def base64_zeros(size: int) -> bytes:
    data = base64.encodebytes(b"\0" * size)
    return (
        HEAD + b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
        b"Content-Type: text/plain\r\n\r\nSee attached.\r\n--B\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + data
        + b"\r\n--B--\r\n"
    )


def plain_mail(size: int) -> bytes:
    """The yardstick: ordinary text of the same size, in the same kind of lines."""
    line = b"An ordinary line of text in an ordinary mail, nothing more.\r\n"
    head = HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def plain_html(size: int) -> bytes:
    unit = "<p>An ordinary paragraph of text in an ordinary mail.</p>\n"
    return html_mail(unit * max(1, size // len(unit)))


def process(raw: bytes) -> None:
    mail = parse_mail(raw)
    render_message(mail, root=True)
    render_message(mail, root=False)


@dataclass
class Cost:
    seconds: float
    peak_bytes: int


def cost(raw: bytes, runs: int = 1) -> Cost:
    seconds = float("inf")
    for _ in range(runs):  # the best run: the one least disturbed by the machine
        gc.collect()
        start = time.process_time()
        process(raw)
        seconds = min(seconds, time.process_time() - start)
    gc.collect()
    tracemalloc.start()
    try:
        process(raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return Cost(max(seconds, 0.01), peak)


# (name, worst case, yardstick of the same size, time ratio, memory ratio, runs). The bounds are
# 2-4x the ratios measured now, and far below the old code's: deep HTML 164x time and 92x memory
# at 3,000 levels, 168x and 146x at 5,000; 5,000 parts 28x time.
CASES: list[tuple[str, Callable[[], bytes], Callable[[int], bytes], float, float, int]] = [
    ("deep HTML, 3,000 levels", lambda: deep_html(3000), plain_html, 8, 6, 3),
    ("deep HTML, 5,000 levels", lambda: deep_html(5000), plain_html, 8, 6, 3),
    ("deep lists, 5,000 levels", lambda: deep_lists(5000), plain_html, 8, 6, 3),
    ("100 MIME levels, 300,000 lines", lambda: deep_mime(100, 300_000), plain_mail, 6, 4, 1),
    ("3,000 MIME levels", lambda: deep_mime(3000, 10), plain_mail, 10, 6, 3),
    ("5,000 parts", lambda: many_parts(5000), plain_mail, 15, 8, 3),
    ("huge headers", huge_headers, plain_mail, 15, 8, 5),
    ("20 MB of base64 zeros", lambda: base64_zeros(20_000_000), plain_mail, 5, 3, 1),
]


@pytest.mark.parametrize(
    ("make", "yardstick", "time_ratio", "memory_ratio", "runs"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_worst_case_costs_like_a_plain_mail(
    make: Callable[[], bytes],
    yardstick: Callable[[int], bytes],
    time_ratio: float,
    memory_ratio: float,
    runs: int,
) -> None:
    worst = make()
    plain = yardstick(len(worst))
    worst_cost, plain_cost = cost(worst, runs), cost(plain, runs)
    ratios = (
        worst_cost.seconds / plain_cost.seconds,
        worst_cost.peak_bytes / plain_cost.peak_bytes,
    )
    print(f"{len(worst):,} bytes: {worst_cost} vs {plain_cost}: ratios {ratios}")
    assert ratios[0] <= time_ratio, f"{worst_cost.seconds:.2f} s vs {plain_cost.seconds:.2f} s"
    assert ratios[1] <= memory_ratio, f"{worst_cost.peak_bytes:,} B vs {plain_cost.peak_bytes:,} B"


def test_legal_extremes_keep_their_text() -> None:
    """The same mails as above that Postfix would accept: their text comes through."""
    mail = parse_mail(deep_mime(100, 10))
    assert mail.text.startswith("deep text") and mail.problems == []
    mail = parse_mail(huge_headers())
    assert len(mail.participants()) == 2001 and mail.problems == []
    content = render_message(mail, root=True)
    assert content.body.endswith("\n\nThe body.") and not content.truncated
    mail = parse_mail(base64_zeros(1_000_000))
    assert mail.text == "See attached." and len(mail.attachments[0].data) == 1_000_000
    mail = parse_mail(deep_html(3000))
    assert "line 02999 of the quote" in mail.text


# --- limits, each with a readable note ------------------------------------------------------


def nested(depth: int) -> bytes:
    body = part("Content-Type: text/plain", "deep text")
    for level in reversed(range(depth)):
        body = part(
            f"Content-Type: multipart/mixed; boundary=b{level}",
            multipart(body, boundary=f"b{level}"),
        )
    return mail(SHORT_HEAD).rsplit(b"\r\n\r\n", 1)[0] + b"\r\n" + body


@pytest.mark.parametrize(
    ("depth", "text", "problem"),
    [
        (20, "deep text", None),
        # Postfix's mime_nesting_limit: legal mail, whose text must come through.
        (MAX_DEPTH, "deep text", None),
        # Deeper: what lies above the limit is read, the rest is in the attached original.
        (MAX_DEPTH + 1, "", TOO_DEEP),
        (3000, "", TOO_DEEP),
    ],
)
def test_absurd_nesting(depth: int, text: str, problem: str | None) -> None:
    raw = nested(depth)
    parsed = parse_mail(raw)
    assert parsed.text == text
    assert parsed.subject == "Hi"
    assert parsed.problems == ([problem] if problem else [])
    if problem:
        assert [(a.filename, a.data) for a in parsed.attachments] == [("message.eml", raw)]
    else:
        assert parsed.attachments == []


def test_text_above_too_deep_nesting_is_kept() -> None:
    deep = nested(MAX_DEPTH + 5).split(b"\r\n", 4)[-1]  # without the top-level headers
    body = multipart(part("Content-Type: text/plain", "Text before the deep part."), deep)
    raw = mail(SHORT_HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body)
    parsed = parse_mail(raw)
    assert parsed.text == "Text before the deep part."
    assert parsed.problems == [TOO_DEEP]
    assert [a.filename for a in parsed.attachments] == ["message.eml"]


def test_embedded_messages_deeper_than_the_parser_can_recurse() -> None:
    raw = mail(
        SHORT_HEAD + "\nContent-Type: message/rfc822", b"Content-Type: message/rfc822\n\n" * 3000
    )
    parsed = parse_mail(raw)
    assert (parsed.subject, parsed.problems) == ("Hi", [WHOLE])


def test_too_many_attachments() -> None:
    count = MAX_ATTACHMENTS + 50
    parts = [part("Content-Type: application/octet-stream", f"{n}") for n in range(count)]
    body = multipart(part("Content-Type: text/plain", "Body."), *parts)
    raw = mail(SHORT_HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body)
    parsed = parse_mail(raw)
    assert parsed.text == "Body."
    assert [a.data for a in parsed.attachments[:-1]] == [b"%d" % n for n in range(MAX_ATTACHMENTS)]
    assert (parsed.attachments[-1].filename, parsed.attachments[-1].data) == ("message.eml", raw)
    assert parsed.problems == [
        f"The message has {count} attachments; only the first {MAX_ATTACHMENTS} are posted, "
        "the rest are in the original"
    ]


def test_too_many_parts() -> None:
    # Empty text parts: no attachments, so only the part count is over its limit.
    parts = [part("Content-Type: text/plain", "") for _ in range(MAX_PARTS + 50)]
    body = multipart(part("Content-Type: text/plain", "Body."), *parts)
    raw = mail(SHORT_HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body)
    parsed = parse_mail(raw)
    assert parsed.text == "Body."
    assert [a.filename for a in parsed.attachments] == ["message.eml"]
    assert parsed.problems == [
        f"The message has {MAX_PARTS + 52} parts; only the first {MAX_PARTS} were read, "
        "the rest are in the original"
    ]


def test_problems_are_capped() -> None:
    broken = part("Content-Type: text/plain\nContent-Transfer-Encoding: base64", "!!!")
    body = multipart(part("Content-Type: text/plain", "Body."), *[broken] * 30)
    parsed = parse_mail(
        mail(SHORT_HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body)
    )
    assert parsed.text == "Body."
    assert len(parsed.problems) == 21
    assert parsed.problems[0] == "Part 3 (text/plain) could not be decoded"
    assert parsed.problems[-1] == "10 further problems with this message are not listed"


def test_long_text_part_is_cut_and_attached_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(from_email, "MAX_TEXT_CHARS", 1000)
    text = "".join(f"line {n}\n" for n in range(500))
    parsed = parse_mail(mail(SHORT_HEAD + "\nContent-Type: text/plain; charset=utf-8", text))
    assert text.startswith(parsed.text) and len(parsed.text) < 1000
    assert parsed.problems == ["Part 1 (text/plain) is too long; the whole text is attached"]
    [whole] = parsed.attachments
    assert (whole.filename, whole.data) == ("attachment.txt", text.encode().replace(b"\n", b"\r\n"))


def test_huge_attachment_is_left_out_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(from_email, "MAX_PART_BYTES", 1000)
    body = multipart(
        part("Content-Type: text/plain", "Body."),
        attachment_part("application/pdf", b"%PDF" * 1000),
        attachment_part("application/pdf", b"%PDF"),
    )
    raw = mail(SHORT_HEAD + "\nContent-Type: multipart/mixed; boundary=BOUNDARY", body)
    parsed = parse_mail(raw)
    assert parsed.text == "Body."
    assert [a.data for a in parsed.attachments] == [b"%PDF", raw]  # and the original, whole
    assert parsed.problems == [
        "Part 3 (application/pdf) is larger than 0 MB and was left out; it is in the original"
    ]


def test_two_thousand_recipients() -> None:
    people = [f'"Person {n}" <person.{n}@example.org>' for n in range(2000)]
    headers = SHORT_HEAD.replace("To: alice@example.net", "To: " + ", ".join(people[:1500]))
    headers += "\nCc: " + ", ".join(people[1500:])
    parsed = parse_mail(mail(headers))
    assert (len(parsed.to), len(parsed.cc), parsed.problems) == (1500, 500, [])
    everyone = parsed.participants()
    assert len(everyone) == 2001
    assert everyone[1] == Address("Person 0", "person.0@example.org")
    assert everyone[-1] == Address("Person 1999", "person.1999@example.org")
