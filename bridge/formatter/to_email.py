"""A Matrix message → RFC 5322 bytes for the outbound mail. Pure: no network, no database.

Everything that reaches a header is untrusted (display names, subjects, filenames, ids from
incoming mail), so it is reduced to one line of text *before* the email package sees it; address
and id headers are written here outright. The finished bytes are checked once more: every header
block must hold exactly the headers built here. CPython releases before 3.11.10 and 3.12.5 did
not refuse newlines in folded headers themselves (CVE-2024-6923), so the stdlib is not the only
guard.
"""

from __future__ import annotations

import base64
import email.policy
import html as html_lib
import re
import secrets
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import MessageError
from email.message import EmailMessage
from email.utils import format_datetime
from urllib.parse import unquote

from .html import has_content, html_to_text, sanitize_html, text_to_html, tokenize
from .media import sanitize_filename

# 7bit: non-ASCII text goes out as quoted-printable or base64, and header text as RFC 2047/2231
# encoded-words, so the mail passes any relay, SMTPUTF8 or not.
POLICY = email.policy.SMTP.clone(cte_type="7bit", raise_on_defect=True)

MAX_LINE = 998  # RFC 5322 section 2.1.1, without the CRLF
MAX_NAME_CHARS = 200
MAX_SUBJECT_CHARS = 900
MAX_REFERENCES = 20
MAX_ID_CHARS = 900  # an id always fits on a line of its own


@dataclass
class OutgoingAttachment:
    filename: str  # untrusted; sanitised in compose
    content_type: str
    data: bytes


@dataclass
class OutgoingMail:
    from_name: str  # the sender's Matrix display name: untrusted
    from_address: str
    to: list[tuple[str, str]]  # (name, address)
    cc: list[tuple[str, str]]
    subject: str  # untrusted
    message_id: str  # without <>, from new_message_id
    in_reply_to: str | None  # without <>
    references: list[str]  # without <>, oldest first
    body: str  # Matrix `body`
    formatted_body: str | None  # Matrix `formatted_body` when format is org.matrix.custom.html
    attachments: list[OutgoingAttachment]
    date: datetime | None = None  # now, when None; naive means UTC
    extra_headers: dict[str, str] = field(default_factory=dict)  # values are sanitised too


# --- header text -----------------------------------------------------------------------------

# Bidi overrides and isolates let a display name or subject read differently from its bytes.
_BIDI = frozenset({"\u200e", "\u200f", "\u061c"} | {chr(c) for c in range(0x202A, 0x202F)}) | {
    chr(c) for c in range(0x2066, 0x206A)
}


def one_line(text: str, limit: int) -> str:
    """`text` as a single line: control characters and line/paragraph separators (CR, LF, NUL,
    U+0085, U+2028, U+2029, …) become spaces, bidi controls go, whitespace is collapsed, and
    the result is cut to `limit` characters."""
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates cannot be encoded
    kept = []
    for ch in text:
        if ch in _BIDI:
            continue
        kept.append(" " if unicodedata.category(ch) in ("Cc", "Zl", "Zp") else ch)
    # str.split() also splits on U+001C-U+001F and U+0085, which str.splitlines() treats as line
    # breaks: the email package refuses a header value that splitlines() would cut.
    return " ".join("".join(kept).split())[:limit].strip()


def header_text(text: str, limit: int) -> str:
    """`text` as header text: `one_line`, and "=?" becomes "= ?"."""
    text = one_line(text, limit)
    # The email package decodes RFC 2047 encoded-words in the values it is given and writes the
    # decoded text back out: "=?utf-8?q?=0D=0ABcc:_x?=" would become a real header line. With no
    # "=?" left, no encoded-word can start (the replacement cannot form a new one).
    return text.replace("=?", "= ?")


_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ADDR_SPEC = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@({_DOMAIN.pattern})")


def check_address(address: str) -> str:
    """`address` if it is one plain ASCII addr-spec (dot-atom local part, hostname domain);
    ValueError otherwise. The caller validated it already: this is the last line of defence."""
    match = _ADDR_SPEC.fullmatch(address) if isinstance(address, str) else None
    if match is None or len(match.group(1)) > 64 or len(address) > 254:
        raise ValueError(f"not a single plain email address: {address!r}")
    return address


_ATOM_PHRASE = re.compile(rf"{_ATEXT}+(?: {_ATEXT}+)*")
_FITS = 70  # characters of a token that still fit a 78-character line after "From: "
_ENCODED_BYTES = 45  # UTF-8 bytes per encoded-word: 60 in base64, 72 with its frame


def _phrase(name: str) -> list[str]:
    """A cleaned display name as header tokens: atoms as they are, other ASCII as one quoted
    string, the rest (or what would not fit a line) as RFC 2047 encoded-words. Written here
    rather than by the email package, whose folder (3.11) drops the quotes around a long
    display name: "…, evil@example.com" would turn into one more address."""
    words = name.split(" ")
    if _ATOM_PHRASE.fullmatch(name) and max(len(word) for word in words) <= _FITS:
        return words
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if name.isascii() and len(quoted) <= _FITS:  # printable: header_text left no controls
        return [quoted]
    chunks = [""]
    for ch in name:
        if len((chunks[-1] + ch).encode("utf-8")) > _ENCODED_BYTES:
            chunks.append("")
        chunks[-1] += ch
    # Whitespace between encoded-words is not text (RFC 2047 section 6.2), so spaces stay
    # inside the chunks and nothing is lost between them.
    return [f"=?utf-8?b?{base64.b64encode(c.encode('utf-8')).decode('ascii')}?=" for c in chunks]


def _mailboxes(pairs: list[tuple[str, str]]) -> list[str]:
    """Header tokens for a mailbox list: [phrase…] <address>, comma-separated. ValueError for
    an address that is not one plain addr-spec."""
    tokens: list[str] = []
    for index, (name, address) in enumerate(pairs):
        cleaned = header_text(name or "", MAX_NAME_CHARS)
        phrase = _phrase(cleaned) if cleaned else []
        box = [*phrase, f"<{check_address(address)}>"] if phrase else [check_address(address)]
        if index < len(pairs) - 1:
            box[-1] += ","
        tokens += box
    return tokens


_REPLY_PREFIX = re.compile(
    r"^(?:\s*(?:re|aw|sv|vs|antw|antwort|odp|res|ref|rif|ynt|回复|回覆|答复)"
    r"\s*(?:\[\d{1,4}\]|\(\d{1,4}\))?\s*[:：])+\s*",
    re.I,
)


def reply_subject(subject: str) -> str:
    """ "Re: <subject>", with the reply prefixes already there ("Re:", "RE:", "Aw:", "Re[2]:",
    …) collapsed into one. An empty subject stays "(no subject)"."""
    base = _REPLY_PREFIX.sub("", header_text(subject, MAX_SUBJECT_CHARS))
    return f"Re: {base}" if base else "(no subject)"


def new_message_id(domain: str) -> str:
    """A fresh Message-ID without <>: 192 random bits, so nobody can guess the id of a mail
    and forge a reply into its thread."""
    if not isinstance(domain, str) or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"not a hostname: {domain!r}")
    return f"{secrets.token_urlsafe(24)}@{domain}"


# Printable ASCII without the brackets: what can stand between "<" and ">" on any relay.
_MESSAGE_ID = re.compile(rf"[!-;=?-~]{{1,{MAX_ID_CHARS}}}")


def _ids(values: list[str]) -> list[str]:
    """Usable message ids in order, deduplicated. Ids come from incoming mail, so the ones that
    could not be written back safely are dropped rather than failing the reply."""
    found = []
    for value in values:
        value = value.strip().removeprefix("<").removesuffix(">") if isinstance(value, str) else ""
        if _MESSAGE_ID.fullmatch(value):
            found.append(value)
    return list(dict.fromkeys(found))


def thread_references(references: list[str], in_reply_to: str | None) -> list[str]:
    """The References list: the given ids, then the parent if missing, capped to the root and
    the most recent ancestors (RFC 5322 section 3.6.4 practice)."""
    ids = _ids(references + ([in_reply_to] if in_reply_to else []))
    if len(ids) > MAX_REFERENCES:
        ids = ids[:1] + ids[-(MAX_REFERENCES - 1) :]
    return ids


class _RawHeader(str):
    """A header written exactly as built here, folded only between its tokens. The email
    policy takes any value with a `name` and a `fold` method as a header object.

    Used for addresses (see `_phrase`) and ids: the email package would fold an id longer than
    a line into RFC 2047 encoded-words, which no mailer matches any more."""

    name: str
    tokens: list[str]

    def __new__(cls, name: str, tokens: list[str]) -> _RawHeader:
        header = super().__new__(cls, " ".join(tokens))
        header.name = name
        header.tokens = tokens
        return header

    def fold(self, *, policy: email.policy.Policy) -> str:
        limit = policy.max_line_length or MAX_LINE
        lines: list[str] = []
        line = f"{self.name}:"
        for number, token in enumerate(self.tokens):
            if number and len(line) + 1 + len(token) > limit:
                lines.append(line)
                line = ""
            line += " " + token
        lines.append(line)
        return policy.linesep.join(lines) + policy.linesep


def _id_header(name: str, ids: list[str]) -> _RawHeader:
    return _RawHeader(name, [f"<{value}>" for value in ids])


# --- bodies ----------------------------------------------------------------------------------

_MX_REPLY_OPEN = re.compile(r"<mx-reply[\s/>]", re.I)
_MX_REPLY_CLOSE = re.compile(r"</mx-reply\s*>", re.I)


def _drop_mx_reply(html: str) -> str:
    """Without the reply fallback: from the first <mx-reply> to the last </mx-reply>, so a
    nested fallback goes too. Index search, not a lazy regex, to stay linear."""
    opening = _MX_REPLY_OPEN.search(html)
    if opening is None:
        return html
    end = None
    for closing in _MX_REPLY_CLOSE.finditer(html, opening.start()):
        end = closing.end()
    if end is None:
        return html  # unclosed: not a fallback a client made; the sanitiser drops the tag
    return html[: opening.start()] + html[end:]


def _is_user_link(href: str | None) -> bool:
    """A mention pill (https://matrix.to/#/@user:server), or a link the sanitiser emptied
    (matrix: URIs): neither leads anywhere for a mail reader."""
    if not href:
        return True
    prefix = "https://matrix.to/#/"
    return href.startswith(prefix) and unquote(href[len(prefix) :]).startswith("@")


def _unmatrix(html: str) -> str:
    """Sanitised HTML with mention links reduced to their text and mxc images (custom emoji,
    inline images) to their alt text: mail readers can follow neither."""
    out: list[str] = []
    unwrapped: list[bool] = []  # per open <a>: whether its tags were dropped
    for token in tokenize(html):
        if token.kind == "start" and token.tag == "a":
            unwrapped.append(_is_user_link(token.attrs.get("href")))
            if unwrapped[-1]:
                continue
        elif token.kind == "end" and token.tag == "a":
            if unwrapped and unwrapped.pop():
                continue
        elif token.kind == "start" and token.tag == "img":
            label = token.attrs.get("alt") or token.attrs.get("title") or ""
            out.append(html_lib.escape(label, quote=False))
            continue
        out.append(html[token.start : token.end])
    return "".join(out)


def matrix_html_to_email_html(formatted_body: str) -> str:
    """The text/html part for a Matrix `formatted_body`: reply fallback removed, sanitised to
    the Matrix subset, mentions as plain names, mxc images as their alt text."""
    return _unmatrix(sanitize_html(_drop_mx_reply(formatted_body)))


# "> <@alice:example.org> original text", or "> * <@alice:…> …" for a reply to an emote.
_FALLBACK_FIRST_LINE = re.compile(r"> (?:\* )?<@[^>\s]+> ")


def _drop_body_fallback(body: str) -> str:
    """Without the plain reply fallback: the "> " lines at the top and the blank line after
    them (https://spec.matrix.org/v1.11/client-server-api/#fallbacks-for-rich-replies)."""
    lines = body.split("\n")
    if not _FALLBACK_FIRST_LINE.match(lines[0]):
        return body
    index = 0
    while index < len(lines) and lines[index].startswith(">"):
        index += 1
    if index < len(lines) and not lines[index].strip():
        index += 1
    return "\n".join(lines[index:])


def _clean_body(text: str) -> str:
    text = text.encode("utf-8", "replace").decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)


def matrix_body_to_text(body: str, formatted_body: str | None) -> str:
    """The text/plain part. With a `formatted_body` it is rendered from the email HTML, so that
    the two parts agree (mentions as names, no fallback); the `body` with its reply fallback
    removed stands in when there is no HTML or it renders empty."""
    if formatted_body is not None:
        text = html_to_text(matrix_html_to_email_html(formatted_body))
        if text.strip():
            return _clean_body(text)
    return _drop_body_fallback(_clean_body(body or "")).strip("\n")


# --- compose ---------------------------------------------------------------------------------

# Headers compose writes itself; extra_headers may not replace or repeat them.
_OWN_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "date", "message-id", "in-reply-to", "references"}
    | {"mime-version", "sender", "return-path", "received"}
)
_FIELD_NAME = re.compile(r"[!-9;-~]{1,76}")  # RFC 5322 ftext
_CONTENT_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]{1,64}/[a-z0-9!#$&^_.+-]{1,64}")


def compose(mail: OutgoingMail) -> bytes:
    """The mail as RFC 5322 bytes with CRLF line endings. ValueError for an invalid address,
    message id, domain or extra header name, and if the result fails its own check."""
    msg = EmailMessage(policy=POLICY)
    _set_headers(msg, mail)
    text = matrix_body_to_text(mail.body, mail.formatted_body)
    html = matrix_html_to_email_html(mail.formatted_body or "")
    if not has_content(html):  # no HTML, or only a reply fallback: the text stands in
        html = text_to_html(text)
    msg.set_content(text, subtype="plain", charset="utf-8")
    msg.add_alternative(html, subtype="html", charset="utf-8")
    for attachment in mail.attachments:
        _attach(msg, attachment)
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]  # the email package repeats it on every part it creates
    try:
        raw = msg.as_bytes(policy=POLICY)
    except MessageError as error:  # HeaderWriteError, on Pythons that check folded headers
        raise ValueError(f"the mail cannot be written: {error}") from error
    _check_output(raw, msg)
    return raw


def _set_headers(msg: EmailMessage, mail: OutgoingMail) -> None:
    msg["From"] = _RawHeader("From", _mailboxes([(mail.from_name, mail.from_address)]))
    if mail.to:
        msg["To"] = _RawHeader("To", _mailboxes(mail.to))
    if mail.cc:
        msg["Cc"] = _RawHeader("Cc", _mailboxes(mail.cc))
    msg["Subject"] = header_text(mail.subject or "", MAX_SUBJECT_CHARS)
    date = mail.date or datetime.now(UTC)
    msg["Date"] = format_datetime(date if date.tzinfo else date.replace(tzinfo=UTC))
    own_id = _ids([mail.message_id])
    if not own_id or "@" not in own_id[0]:
        raise ValueError(f"not a usable Message-ID: {mail.message_id!r}")
    msg["Message-ID"] = _id_header("Message-ID", own_id)
    parent = _ids([mail.in_reply_to] if mail.in_reply_to else [])
    if parent:
        msg["In-Reply-To"] = _id_header("In-Reply-To", parent)
    references = thread_references(mail.references, parent[0] if parent else None)
    if references:
        msg["References"] = _id_header("References", references)
    for name, value in mail.extra_headers.items():
        _set_extra(msg, name, value)


def _set_extra(msg: EmailMessage, name: str, value: str) -> None:
    if not isinstance(name, str) or not _FIELD_NAME.fullmatch(name):
        raise ValueError(f"not a header name: {name!r}")
    lowered = name.lower()
    if lowered in _OWN_HEADERS or lowered.startswith("content-") or lowered in msg:
        raise ValueError(f"header {name!r} is written by compose or given twice")
    cleaned = header_text(str(value), MAX_LINE)
    if not cleaned:
        return
    try:
        msg[name] = cleaned
    except (MessageError, TypeError) as error:
        raise ValueError(f"header {name!r} cannot take {cleaned!r}") from error


def _attach(msg: EmailMessage, attachment: OutgoingAttachment) -> None:
    content_type = (attachment.content_type or "").split(";", 1)[0].strip().lower()
    # message/* and multipart/* may not be base64-encoded (RFC 2046 section 5.2.1), and bytes
    # from Matrix are not known to be valid MIME: such files go as opaque data.
    if not _CONTENT_TYPE.fullmatch(content_type) or content_type.startswith(
        ("message/", "multipart/")
    ):
        content_type = "application/octet-stream"
    filename = sanitize_filename(header_text(attachment.filename or "", 1000), content_type)
    maintype, subtype = content_type.split("/")
    msg.add_attachment(
        bytes(attachment.data),
        maintype=maintype,
        subtype=subtype,
        filename=filename,  # RFC 2231-encoded by the policy when not ASCII
        params={"name": filename},  # for mailers that only look at Content-Type
    )


def _check_output(raw: bytes, msg: EmailMessage) -> None:
    """Raise ValueError unless `raw` is 7-bit CRLF text with short lines, and every header block
    in it (the message's and each part's) holds exactly the headers built here, in order:
    nothing was injected past the cleaning above, whatever the email package did."""
    crlf = raw.count(b"\r\n")
    if b"\x00" in raw or raw.count(b"\n") != crlf or raw.count(b"\r") != crlf:
        raise ValueError("composed mail has NUL or bare CR/LF")
    if not raw.isascii():
        raise ValueError("composed mail is not 7-bit")
    lines = raw.split(b"\r\n")
    if any(len(line) > MAX_LINE for line in lines):
        raise ValueError("composed mail has a line longer than 998 characters")
    parts = list(msg.walk())
    # The generator picks boundaries that occur nowhere in the content, so a delimiter line
    # starts a part's header block and nothing else does.
    delimiters = {b"--" + str(p.get_boundary()).encode() for p in parts if p.is_multipart()}
    expected = [[name.lower() for name in part.keys()] for part in parts]
    found: list[list[str]] = [[]]
    in_head = True
    for line in lines:
        if in_head and not line:
            in_head = False
        elif in_head and line[:1] not in (b" ", b"\t"):
            found[-1].append(line.split(b":", 1)[0].decode("ascii").strip().lower())
        elif not in_head and line in delimiters:
            found.append([])
            in_head = True
    if found != expected:
        raise ValueError(f"composed header blocks {found} differ from those built, {expected}")
