"""Raw RFC 5322 bytes → `ParsedMail`, and `ParsedMail` → the content of a Matrix text event.

Pure: no network, no database, no Matrix client. `parse_mail` never raises: anything it cannot
read becomes a sentence in `ParsedMail.problems` and the rest of the mail is still delivered.

Headers are read from the raw stored values and decoded here rather than through the stdlib's
header registry, whose parser has raised on odd input in past CPython releases and which turns
raw 8-bit (RFC 6532) headers into replacement characters.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email
import email.message
import email.parser
import email.policy
import email.utils
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from urllib.parse import unquote

from . import mime
from .html import (
    has_content,
    html_to_text,
    sanitize_html,
    text_to_html,
    too_deep,
)
from .media import fallback_filename, image_dimensions, msgtype_for, sanitize_filename
from .quotes import collapse_html_quotes, collapse_plain_quotes

# Limits on what one mail may cost. Each is far beyond legal mail (Postfix's defaults are cited
# where they apply), and each one that is hit leaves a note in `ParsedMail.problems`.
MAX_DEPTH = mime.MAX_DEPTH  # multipart nesting: Postfix's mime_nesting_limit
MAX_PARTS = 500  # MIME parts looked at; the parser itself is linear, the walk per part is not free
MAX_ATTACHMENTS = 100  # attachments posted: each is an upload and an event in the room
MAX_HEADER_CHARS = 102_400  # one header's value: Postfix's header_size_limit
MAX_ADDRESSES = 5_000  # per address header; 2,000 recipients in To and Cc parse in well under 1 s
MAX_MESSAGE_IDS = 100
# Decoded text of one body part. Far beyond any real mail, and the Matrix event is cut to ~40 KB
# anyway; bounds sanitising and quote-collapsing time. A longer part is also attached whole.
MAX_TEXT_CHARS = 1_000_000
MAX_HTML_CHARS = MAX_TEXT_CHARS
# Decoded size of one attachment: above the default 25 MiB message limit (email.max_size), so it
# only matters where an admin raised that; larger parts are left out with a note.
MAX_PART_BYTES = 64 * 1024 * 1024
# Each problem becomes a notice in the room; more than this are counted, not listed.
MAX_PROBLEMS = 20


@dataclass
class Address:
    """One mailbox."""

    name: str  # decoded display name, may be ""
    address: str  # domain lowercased, local part as given; "" if unparseable


@dataclass
class Attachment:
    filename: str  # sanitised and never empty, see media.sanitize_filename
    content_type: str  # lowercase "type/subtype"
    data: bytes
    content_id: str | None  # without <>, for inline cid: images
    inline: bool  # Content-Disposition inline, or referenced by cid: from the HTML
    msgtype: str  # "m.image" | "m.video" | "m.audio" | "m.file"
    width: int | None = None  # images only, when cheap to read from the header
    height: int | None = None


@dataclass
class ParsedMail:
    message_id: str | None = None  # without <>
    in_reply_to: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)
    subject: str = ""
    from_: Address | None = None
    sender: Address | None = None
    reply_to: list[Address] = field(default_factory=list)
    to: list[Address] = field(default_factory=list)
    cc: list[Address] = field(default_factory=list)
    list_id: str | None = None
    auto_submitted: str | None = None  # lowercased, absent when missing or "no"
    precedence: str | None = None
    date: datetime | None = None  # always timezone-aware
    text: str = ""
    html: str | None = None  # sanitised; None when the mail had no HTML
    attachments: list[Attachment] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def participants(self) -> list[Address]:
        """From, To, Cc and Reply-To, one entry per address in that order. A later display
        name fills in for an earlier entry that had none."""
        seen: dict[str, Address] = {}
        everyone = ([self.from_] if self.from_ else []) + self.to + self.cc + self.reply_to
        for entry in everyone:
            if not entry.address:
                continue
            key = entry.address.lower()
            if key not in seen:
                seen[key] = Address(entry.name, entry.address)
            elif not seen[key].name:
                seen[key].name = entry.name
        return list(seen.values())


# --- decoding bytes and headers -------------------------------------------------------------

# Codecs Python knows but that are not charsets a mail may ask for: decoding with them is
# either meaningless or, for unicode_escape and friends, an interpreter of the sender's text.
_REFUSED_CODECS = {"idna", "punycode", "raw_unicode_escape", "unicode_escape", "undefined"}


def _codec(charset: str | None) -> str | None:
    if not charset:
        return None
    name = charset.strip().strip("\"'").lower()
    if name in ("iso-8859-1", "latin1", "latin-1", "iso8859-1", "us-ascii", "ascii"):
        # What is labelled Latin-1 is in practice windows-1252 (HTML5 decodes it that way), and
        # "us-ascii" is a common label for UTF-8 from misconfigured mailers; both fall back below.
        name = "windows-1252" if "1" in name else "utf-8"
    try:
        info = codecs.lookup(name)
    except (LookupError, ValueError):
        return None
    if not getattr(info, "_is_text_encoding", True) or info.name in _REFUSED_CODECS:
        return None  # base64_codec, zlib_codec, rot13, …
    return info.name


def decode_bytes(data: bytes, charset: str | None) -> str:
    """Text from `data` in the declared charset, falling back through UTF-8 and windows-1252 to
    Latin-1 (which cannot fail). Mislabelled mail is common, so a label is only a first guess."""
    declared = _codec(charset)
    for name in dict.fromkeys(c for c in (declared, "utf-8", "windows-1252") if c):
        try:
            return data.decode(name)
        except (UnicodeDecodeError, LookupError, ValueError, TypeError):
            continue
    if declared:
        try:
            return data.decode(declared, errors="replace")
        except (LookupError, ValueError, TypeError):
            pass
    return data.decode("latin-1")


def _to_text(value: object) -> str:
    """A raw header value as text. The bytes parser keeps 8-bit bytes as surrogate escapes."""
    text = str(value)[:MAX_HEADER_CHARS]
    if any("\udc80" <= ch <= "\udcff" for ch in text):
        text = decode_bytes(text.encode("utf-8", "surrogateescape"), None)
    text = text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates past this point
    return re.sub(r"\r?\n(?=[ \t])|\r|\n", "", text)  # unfold


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")


def _decode_word(encoding: str, text: str) -> bytes:
    if encoding in "Bb":
        raw = re.sub(r"[^A-Za-z0-9+/]", "", text)
        raw = raw[: len(raw) - 1] if len(raw) % 4 == 1 else raw
        return base64.b64decode(raw + "=" * (-len(raw) % 4))
    raw = text.replace("_", " ").encode("ascii", "replace")
    return re.sub(rb"=([0-9A-Fa-f]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded-words. Adjacent words in one charset are joined before decoding
    because mailers split multi-byte characters across them."""
    out: list[str] = []
    pending: list[bytes] = []
    pending_charset = ""
    pos = 0

    def flush() -> None:
        if pending:
            out.append(decode_bytes(b"".join(pending), pending_charset))
            pending.clear()

    for match in _ENCODED_WORD.finditer(value):
        between = value[pos : match.start()]
        charset = match.group(1).split("*")[0]  # RFC 2231 adds *language
        # Whitespace between two encoded-words is folding, not text (RFC 2047 section 6.2).
        if between.strip() or not pending or charset.lower() != pending_charset.lower():
            flush()
            if between.strip() or not out:
                out.append(between)
        try:
            pending.append(_decode_word(match.group(2), match.group(3)))
            pending_charset = charset
        except (binascii.Error, ValueError):
            flush()
            out.append(match.group(0))
        pos = match.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


def _clean_line(text: str) -> str:
    """One line of display text: control characters gone, whitespace collapsed."""
    return " ".join(re.sub(r"[\x00-\x1f\x7f]", " ", text).split())


class _Headers:
    """Case-insensitive access to one part's raw headers, decoded to text."""

    def __init__(self, message: Message) -> None:
        self._values: dict[str, list[str]] = {}
        try:
            items = list(message.raw_items())
        except Exception:
            items = []
        for name, value in items:
            self._values.setdefault(str(name).strip().lower(), []).append(_to_text(value))

    def all(self, name: str) -> list[str]:
        return self._values.get(name, [])

    def first(self, name: str) -> str | None:
        values = self._values.get(name)
        return values[0] if values else None

    def params(self) -> Message:
        """A compat32 view of the MIME headers, whose parameter parsing (RFC 2231 included)
        works on raw strings and is lenient."""
        view = Message()
        for name in ("content-type", "content-disposition"):
            value = self.first(name)
            if value is not None:
                view[name] = value
        return view


_MESSAGE_ID = re.compile(r"<([^<>\s\x00-\x1f\x7f]{1,998})>")


def _message_ids(value: str | None) -> list[str]:
    if not value:
        return []
    found = _MESSAGE_ID.findall(value)
    if not found:
        # Some mailers drop the angle brackets; accept bare tokens that look like ids.
        found = [t for t in value.split() if "@" in t and not re.search(r"[<>\x00-\x1f]", t)]
    ids = list(dict.fromkeys(found))
    if len(ids) > MAX_MESSAGE_IDS:
        ids = ids[:1] + ids[-(MAX_MESSAGE_IDS - 1) :]  # the root and the recent ancestors
    return ids


def _content_id(value: str | None) -> str | None:
    ids = _message_ids(value)
    if ids:
        return ids[0]
    bare = (value or "").strip()
    return bare if bare and not re.search(r"[\s<>\x00-\x1f\x7f]", bare) else None


def _address(raw: str) -> str:
    raw = raw.strip().strip("<>")
    local, at, domain = raw.rpartition("@")
    if not at or not local or not domain or re.search(r"[\s\x00-\x1f\x7f<>]", raw):
        return ""
    return f"{local}@{domain.lower().rstrip('.')}"


def _addresses(values: list[str]) -> list[Address]:
    try:
        pairs = email.utils.getaddresses(values)
    except Exception:
        return []
    result = []
    for name, raw in pairs[:MAX_ADDRESSES]:
        entry = Address(_clean_line(decode_words(name))[:256], _address(raw))
        if entry.name or entry.address:
            result.append(entry)
    return result


def _date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)  # "-0000": UTC, origin unknown


def _list_id(value: str | None) -> str | None:
    if not value:
        return None
    match = re.search(r"<([^<>\s]+)>", value)
    if match:
        return match.group(1).lower()
    bare = value.strip()
    return bare.lower() if bare and not re.search(r"[\s<>]", bare) else None


def _fill_headers(mail: ParsedMail, headers: _Headers) -> None:
    ids = _message_ids(headers.first("message-id"))
    mail.message_id = ids[0] if ids else None
    mail.in_reply_to = _message_ids(headers.first("in-reply-to"))
    mail.references = _message_ids(" ".join(headers.all("references")))
    mail.subject = _clean_line(decode_words(headers.first("subject") or ""))
    from_ = _addresses(headers.all("from"))
    sender = _addresses(headers.all("sender"))
    mail.from_ = from_[0] if from_ else None
    mail.sender = sender[0] if sender else None
    mail.reply_to = _addresses(headers.all("reply-to"))
    mail.to = _addresses(headers.all("to"))
    mail.cc = _addresses(headers.all("cc"))
    mail.list_id = _list_id(headers.first("list-id"))
    auto = _clean_line(headers.first("auto-submitted") or "").lower()
    mail.auto_submitted = auto if auto and auto.split(";")[0].strip() != "no" else None
    mail.precedence = _clean_line(headers.first("precedence") or "").lower() or None
    mail.date = _date(headers.first("date"))


# --- MIME structure --------------------------------------------------------------------------

_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")
_BODY_TYPES = ("text/plain", "text/html")
# Alternatives of the body that are neither the text nor the HTML we pick (AMP, enriched, …).
_IGNORED_ALTERNATIVES = ("text/x-amp-html", "text/enriched", "text/richtext", "text/watch-html")


def _content_type(part: Message, headers: _Headers) -> str:
    value = headers.first("content-type")
    if value is None:
        try:
            return part.get_default_type()  # message/rfc822 inside multipart/digest
        except Exception:
            return "text/plain"
    kind = value.split(";", 1)[0].strip().lower()
    return kind if _CONTENT_TYPE.fullmatch(kind) else "text/plain"  # RFC 2045 section 5.2


def _param(view: Message, name: str) -> str | None:
    try:
        value = view.get_param(name)
    except Exception:
        return None
    if isinstance(value, tuple):  # an RFC 2231 triple that collapse did not handle
        value = email.utils.collapse_rfc2231_value(value)
    return str(value) if value is not None else None


def _filename(view: Message) -> str | None:
    try:
        name = view.get_filename()
    except Exception:
        return None
    if not name:
        return None
    return decode_words(str(name))  # RFC 2047 inside a parameter: wrong, and common


def _disposition(view: Message) -> str | None:
    try:
        value = view.get_content_disposition()
    except Exception:
        return None
    return value.lower() if value else None


_NOT_BASE64 = re.compile(r"[^A-Za-z0-9+/=\s]", re.ASCII)
_PADDING = re.compile(r"=[=\s]*$", re.ASCII)


def _decode_base64(payload: str) -> tuple[bytes, bool]:
    """Decode leniently; the flag says the encoding was damaged. Like mail clients, show what
    decodes: everything before the first character that is not base64 (a list footer or junk
    appended to the part), and what stands before the padding. Missing padding alone is not
    damage: it is common and loses nothing. No copies of the payload beyond one or two."""
    junk = _NOT_BASE64.search(payload)
    damaged = junk is not None
    if junk is not None:
        payload = payload[: junk.start()]
    padding = payload.find("=")
    if padding != -1:
        damaged = damaged or _PADDING.match(payload, padding) is None  # data after the padding
        payload = payload[:padding]
    data = payload.encode("ascii")
    count = len(data) - sum(data.count(c) for c in (b" ", b"\t", b"\r", b"\n", b"\f", b"\v"))
    if count % 4 == 1:
        damaged = True  # a lone trailing character carries no byte; cut it below
        data = data.rstrip()[:-1]
    return binascii.a2b_base64(data + b"=" * (-count % 4)), damaged


def _payload_bytes(part: Message, headers: _Headers) -> tuple[bytes, bool]:
    """The part's decoded body and whether its transfer encoding was damaged."""
    if part.is_multipart():
        return b"", True
    cte = (headers.first("content-transfer-encoding") or "").strip().lower()
    if cte == "base64":
        # The stdlib decodes junk silently; decoding here tells damage from missing padding.
        return _decode_base64(str(part.get_payload()))
    # Quoted-printable, uuencode and the identity encodings; get_payload() without decode=True
    # would already have decoded 8-bit bytes as text, lossily.
    data = part.get_payload(decode=True)
    return (data if isinstance(data, bytes) else b""), False


def _serialize(message: object) -> bytes:
    """An embedded message as bytes, headers as received where the generator allows."""
    if not isinstance(message, Message):
        return b""
    for policy in (email.policy.compat32, email.policy.default):
        try:
            return message.as_bytes(policy=policy)
        except Exception:
            continue
    return b""


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_:.-]+)""", re.I)


def _unflow(text: str, delsp: bool) -> str:
    """Join RFC 3676 format=flowed soft line breaks (a line ending in a space continues)."""
    joined: list[tuple[int, list[str]]] = []  # quote depth, pieces (no string rebuilt per line)
    open_ = False
    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        content = content[1:] if content.startswith(" ") else content  # space-stuffing
        soft = content.endswith(" ") and content != "-- "
        if soft and delsp:
            content = content[:-1]
        if joined and open_ and joined[-1][0] == depth:
            joined[-1][1].append(content)
        else:
            joined.append((depth, [content]))
        open_ = soft
    lines = ((d, "".join(pieces)) for d, pieces in joined)
    return "\n".join(">" * d + (" " if d and t else "") + t for d, t in lines)


def _clean_text(text: str) -> str:
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)


@dataclass
class _Body:
    """One body unit in reading order: a text part, an HTML part, or an alternative of both."""

    plain: str | None = None
    html: str | None = None  # decoded, not yet sanitised


class _Walker:
    """Depth-first walk over the MIME tree that sorts parts into bodies and attachments."""

    def __init__(self) -> None:
        self.count = 0
        self.bodies: list[_Body] = []
        self.attachments: list[Attachment] = []
        self.problems: list[str] = []
        self.unlisted = 0  # problems beyond MAX_PROBLEMS
        self.skipped_attachments = 0
        self.incomplete = False  # something was left out: the caller attaches the original

    def note(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        else:
            self.unlisted += 1

    def finish(self) -> list[str]:
        """The problems, with counts for what the caps left out."""
        problems = list(self.problems)
        if self.skipped_attachments:
            # Past MAX_PARTS attachments are not even counted.
            more = "more than " if self.count > MAX_PARTS else ""
            problems.append(
                f"The message has {more}{MAX_ATTACHMENTS + self.skipped_attachments} attachments;"
                f" only the first {MAX_ATTACHMENTS} are posted, the rest are in the original"
            )
        if self.count > MAX_PARTS:
            problems.append(
                f"The message has {self.count} parts; only the first {MAX_PARTS} were read, "
                "the rest are in the original"
            )
        if self.unlisted:
            problems.append(f"{self.unlisted} further problems with this message are not listed")
        return problems

    def walk(self, part: Message, depth: int) -> None:
        self.count += 1
        number = self.count
        if number > MAX_PARTS:
            self.incomplete = True
            return
        headers = _Headers(part)
        ctype = _content_type(part, headers)
        if depth > MAX_DEPTH:
            self.incomplete = True
            self.note(f"Part {number} ({ctype}) is nested too deeply and was skipped")
            return
        try:
            self._part(part, headers, ctype, number, depth)
        except RecursionError:
            raise  # caught once, in parse_mail: not worth a note per level
        except Exception:
            self.note(f"Part {number} ({ctype}) could not be read")

    def _part(self, part: Message, headers: _Headers, ctype: str, number: int, depth: int) -> None:
        view = headers.params()
        if ctype.startswith("multipart/"):
            children = part.get_payload()
            if not isinstance(children, list):
                self._unsplit(_payload_bytes(part, headers)[0], ctype, number, depth)
            elif ctype == "multipart/alternative":
                self._alternative(children, depth)
            else:
                for child in children:
                    self.walk(child, depth + 1)
        elif ctype in _BODY_TYPES and _is_body(view, ctype):
            text = self._text(part, headers, view, ctype, number)
            if text is not None:
                self.bodies.append(_Body(html=text) if ctype == "text/html" else _Body(text))
        else:
            self._attachment(part, headers, view, ctype, number)

    def _alternative(self, children: list, depth: int) -> None:
        # Alternatives run from plainest to richest (RFC 2046 section 5.1.4): the last text and
        # the last HTML win. Calendar parts among them are still attachments.
        chosen = _Body()
        outer = self.bodies
        for child in children:
            if not isinstance(child, Message):
                continue
            if _content_type(child, _Headers(child)) in _IGNORED_ALTERNATIVES:
                self.count += 1
                continue
            self.bodies = []
            self.walk(child, depth + 1)
            plains = [b.plain for b in self.bodies if b.plain is not None]
            htmls = [b.html for b in self.bodies if b.html is not None]
            chosen.plain = "\n\n".join(plains) if plains else chosen.plain
            chosen.html = "\n".join(htmls) if htmls else chosen.html
        self.bodies = outer
        if chosen.plain is not None or chosen.html is not None:
            self.bodies.append(chosen)

    def _unsplit(self, payload: bytes, ctype: str, number: int, depth: int) -> None:
        """A multipart whose boundary is missing or wrong: guess it from the first "--" line."""
        if not payload.strip():
            return  # nothing to show or guess (also where mime.nesting_cut cut the mail)
        guess = re.search(rb"^--([^\s\"\\]{1,200})[ \t]*\r?$", payload, re.M)
        if guess is None:
            self.note(f"Part {number} ({ctype}) has no usable boundary; shown as text")
            self.bodies.append(_Body(_clean_text(decode_bytes(payload[:MAX_TEXT_CHARS], None))))
            return
        self.note(f"Part {number} ({ctype}) has a wrong boundary; its parts were guessed")
        head = f'Content-Type: {ctype}; boundary="'.encode() + guess.group(1) + b'"\r\n\r\n'
        guessed = head + payload
        cut = mime.nesting_cut(guessed, MAX_DEPTH - depth)
        if cut is not None:
            self.incomplete = True
            self.note(f"Part {number} ({ctype}) nests too deeply; only its outer parts were read")
            guessed = guessed[:cut]
        self.walk(mime.parse_bytes(guessed), depth + 1)

    def _text(
        self, part: Message, headers: _Headers, view: Message, ctype: str, number: int
    ) -> str | None:
        data, damaged = _payload_bytes(part, headers)
        if damaged:
            if not data.strip():
                self.note(f"Part {number} ({ctype}) could not be decoded")
                return None
            # What decodes is shown, as mail clients do; the note says the rest is missing.
            self.note(f"Part {number} ({ctype}) is damaged; the text before the damage is shown")
        charset = _param(view, "charset")
        if charset is None and ctype == "text/html":
            meta = _META_CHARSET.search(data[:4096])
            charset = meta.group(1).decode("ascii") if meta else None
        if len(data) > MAX_TEXT_CHARS:
            # Bytes are cut before decoding, so a 20 MB part never becomes a 20 MB string.
            self.note(f"Part {number} ({ctype}) is too long; the whole text is attached")
            self._add_attachment(
                Attachment(fallback_filename(ctype), ctype, data, None, False, "m.file")
            )
            data = data[:MAX_TEXT_CHARS]
        text = _clean_text(decode_bytes(data, charset))
        if ctype == "text/html" and too_deep(text):
            self.note(f"Part {number} ({ctype}) is nested too deeply; shown as text")
        if ctype == "text/plain" and (_param(view, "format") or "").lower() == "flowed":
            text = _unflow(text, (_param(view, "delsp") or "").lower() == "yes")
        return text

    def _add_attachment(self, attachment: Attachment) -> None:
        if len(self.attachments) < MAX_ATTACHMENTS:
            self.attachments.append(attachment)
        else:
            self.skipped_attachments += 1
            self.incomplete = True

    def _attachment(
        self, part: Message, headers: _Headers, view: Message, ctype: str, number: int
    ) -> None:
        if len(self.attachments) >= MAX_ATTACHMENTS:
            self.skipped_attachments += 1  # not decoded: counted only
            self.incomplete = True
            return
        name = _filename(view)
        if part.is_multipart():  # message/rfc822 and friends: the parser split them already
            inner = part.get_payload()
            data = b"".join(_serialize(m) for m in inner) if isinstance(inner, list) else b""
            if not name and ctype == "message/rfc822" and isinstance(inner, list) and inner:
                subject = _Headers(inner[0]).first("subject")
                name = f"{_clean_line(decode_words(subject))}.eml" if subject else None
        elif _encoded_size(part, headers) > MAX_PART_BYTES:
            self.incomplete = True
            self.note(
                f"Part {number} ({ctype}) is larger than {MAX_PART_BYTES >> 20} MB and was "
                "left out; it is in the original"
            )
            return
        else:
            data, damaged = _payload_bytes(part, headers)
            if damaged:
                self.note(f"Part {number} ({ctype}) may be damaged: its base64 encoding is broken")
        content_id = _content_id(headers.first("content-id"))
        msgtype = msgtype_for(ctype)
        size = image_dimensions(data) if msgtype == "m.image" else None
        self._add_attachment(
            Attachment(
                filename=sanitize_filename(name, ctype),
                content_type=ctype,
                data=data,
                content_id=content_id,
                inline=_disposition(view) == "inline",
                msgtype=msgtype,
                width=size[0] if size else None,
                height=size[1] if size else None,
            )
        )


def _is_body(view: Message, ctype: str) -> bool:
    """Whether a text part is the mail's text rather than a file. A filename alone does not make
    an inline text/plain part a file: Apple Mail and others name the text they send inline."""
    disposition = _disposition(view)
    if disposition == "attachment":
        return False
    return not _filename(view) or (disposition == "inline" and ctype == "text/plain")


def _encoded_size(part: Message, headers: _Headers) -> int:
    """An upper bound of the decoded size, known before decoding (no encoding expands)."""
    payload = part.get_payload()
    size = len(payload) if isinstance(payload, (str, bytes)) else 0
    cte = (headers.first("content-transfer-encoding") or "").strip().lower()
    return size * 3 // 4 if cte == "base64" else size


# --- parse_mail --------------------------------------------------------------------------------

_FORWARD = re.compile(r"^\s*(?:fwd?|wg|tr|rv|enc)\s*:", re.I)
_CID = re.compile(r"""cid:([^\s"'<>)]+)""", re.I)


def parse_mail(raw: bytes, *, collapse_quotes: bool = True) -> ParsedMail:
    """Parse a raw RFC 5322 message. Never raises: what cannot be read becomes a problem note."""
    try:
        return _parse(raw, collapse_quotes)
    except Exception as exc:  # the last line of defence; _parse guards each part itself
        mail = ParsedMail()
        mail.problems.append(f"The message could not be read ({type(exc).__name__})")
        mail.attachments.append(_whole_message(raw))
        return mail


def _whole_message(raw: bytes) -> Attachment:
    return Attachment("message.eml", "message/rfc822", raw, None, False, "m.file")


WHOLE = "The message structure could not be read; it is attached whole"
TOO_DEEP = (
    f"The message nests parts more than {MAX_DEPTH} levels deep; what lies deeper was not "
    "read, the original is attached"
)


def _load(raw: bytes) -> tuple[Message | None, list[str]]:
    """The parsed tree, cut off below MAX_DEPTH (see mime.py); or, when even that cannot be
    parsed, only the headers."""
    problems = []
    cut = mime.nesting_cut(raw)
    if cut is not None:
        raw = raw[:cut]  # the parts above the cut, and the text they hold, are still read
        problems.append(TOO_DEEP)
    try:
        return mime.parse_bytes(raw), problems
    except RecursionError:
        pass  # a chain of message/rfc822 deeper than the parser can follow
    except Exception:
        pass
    return mime.parse_headers(raw), [WHOLE]


def _parse(raw: bytes, collapse_quotes: bool) -> ParsedMail:
    mail = ParsedMail()
    message, problems = _load(raw)
    mail.problems.extend(problems)
    if message is not None:
        _fill_headers(mail, _Headers(message))
    if message is None or WHOLE in problems:
        mail.attachments.append(_whole_message(raw))
        return mail
    walker = _Walker()
    walker.walk(message, 0)
    mail.attachments = walker.attachments
    mail.problems.extend(walker.finish())
    if problems or walker.incomplete:
        # Left out is not lost: the reader can open the original.
        mail.attachments.append(_whole_message(raw))
    # Forwarded content is the point of a forward, even where it looks like a reply quote.
    collapse = collapse_quotes and not _FORWARD.match(mail.subject)
    _assemble(mail, walker.bodies, collapse)
    return mail


def _assemble(mail: ParsedMail, bodies: list[_Body], collapse: bool) -> None:
    """Fill `text` and `html` from the body units, and mark attachments the HTML refers to."""
    referenced = {
        unquote(cid).lower() for body in bodies if body.html for cid in _CID.findall(body.html)
    }
    for attachment in mail.attachments:
        if attachment.content_id and attachment.content_id.lower() in referenced:
            attachment.inline = True
    texts: list[str] = []
    htmls: list[str] = []
    for body in bodies:
        text, html = _render_body(body, collapse)
        if text.strip() or (html and has_content(html)):
            texts.append(text)
            htmls.append(html)
    mail.text = "\n\n".join(t for t in texts if t.strip()).strip("\n")
    if any(body.html is not None for body in bodies):
        mail.html = "<br><br>".join(h for h in htmls if h)


def _render_body(body: _Body, collapse: bool) -> tuple[str, str]:
    """(plain text, sanitised HTML) for one body unit."""
    html = None
    derived = None  # text made from the HTML, when it was made anyway
    if body.html is not None and too_deep(body.html):
        # Too deep to sanitise as HTML (see html.too_deep): render it as text once, here,
        # rather than once in sanitize_html and again for the plain body.
        derived = html_to_text(body.html)
        html = text_to_html(derived)
    elif body.html is not None:
        # Cutting a quote never deepens HTML, so the one check above covers both steps.
        kept = collapse_html_quotes(body.html, checked=True) if collapse else body.html
        html = sanitize_html(kept, checked=True)
    if body.plain is not None:
        text = collapse_plain_quotes(body.plain) if collapse else body.plain
    else:
        text = derived if derived is not None else html_to_text(html or "")
    text = text.rstrip()
    return text, html if html is not None else text_to_html(text)
