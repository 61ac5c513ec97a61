"""Delivery status notifications (RFC 3464): which recipients of which sent mail failed or were
delayed, and a line to tell the room. Pure: no I/O, and `parse_dsn` never raises.

Only a top-level multipart/report with report-type=delivery-status is read. Bounces in free
text (old qmail, some webmail) are not recognised: guessing from prose would mistake ordinary
mail about "undeliverable" things for bounces.
"""

from __future__ import annotations

import base64
import email
import email.parser
import email.policy
import quopri
import re
from dataclasses import dataclass
from email.message import Message

from .from_email import decode_bytes, decode_words
from .to_email import one_line

MAX_RECIPIENTS = 500
MAX_DIAGNOSTIC_CHARS = 500
MAX_FIELD_CHARS = 4096
# A report has two or three boundaries, a returned message a few more. Many more is not a
# report, and the stdlib parser's time grows with nesting depth times lines.
MAX_BOUNDARIES = 50
_BOUNDARY_PARAM = re.compile(rb"boundary\s*=", re.I)
_REPORT_TYPES = ("delivery-status", "global-delivery-status")  # RFC 3464, RFC 6533
_STATUS_PARTS = ("message/delivery-status", "message/global-delivery-status")
_RETURNED_MESSAGES = ("message/rfc822", "message/global")
_RETURNED_HEADERS = ("text/rfc822-headers", "message/global-headers")


@dataclass
class DsnRecipient:
    address: str  # Original-Recipient when given (the address the mail was sent to), else Final
    action: str  # failed | delayed | delivered | relayed | expanded, lowercase
    status: str  # e.g. "5.1.1"; "" when the report has none
    diagnostic: str | None  # Diagnostic-Code without its "smtp;" type, whitespace collapsed


@dataclass
class Dsn:
    original_message_id: str | None  # without <>
    recipients: list[DsnRecipient]
    reporting_mta: str | None


def parse_dsn(raw: bytes) -> Dsn | None:
    """The report in `raw`, or None when it is not a delivery status notification or cannot be
    read at all. Never raises."""
    try:
        return _parse(raw)
    except Exception:  # a bounce is advisory: unreadable ones are dropped, never fatal
        return None


def _is_report(raw: bytes) -> bool:
    """Whether the top-level Content-Type says delivery report, from the header section alone.

    Every mail is asked this before it is bridged; parsing the whole of a 30 MB mail just to
    learn it is not a bounce took seconds and hundreds of MB (measured in bench/)."""
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=-1)
    header = bytes(raw[: end if end >= 0 else len(raw)])
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(header)
    return message.get_content_type() == "multipart/report" and (
        (_param(message, "report-type") or "").lower() in _REPORT_TYPES
    )


def _parse(raw: bytes) -> Dsn | None:
    if not isinstance(raw, bytes | bytearray) or not _is_report(raw):
        return None
    if len(_BOUNDARY_PARAM.findall(raw)) > MAX_BOUNDARIES:
        return None
    message = email.message_from_bytes(bytes(raw), policy=email.policy.compat32)
    if message.get_content_type() != "multipart/report":
        return None
    if (_param(message, "report-type") or "").lower() not in _REPORT_TYPES:
        return None
    parts = message.get_payload()
    if not isinstance(parts, list):
        return None
    dsn = Dsn(original_message_id=None, recipients=[], reporting_mta=None)
    returned: Message | None = None
    for part in parts:
        if not isinstance(part, Message):
            continue
        kind = part.get_content_type()
        if kind in _STATUS_PARTS and not dsn.recipients:
            _read_status(dsn, _blocks(_status_text(part)))
        elif kind in _RETURNED_MESSAGES + _RETURNED_HEADERS and returned is None:
            returned = _returned(part)
    if returned is not None:
        dsn.original_message_id = _first_id(_field(returned, "message-id"))
    else:
        # No returned headers: a report that answers the mail directly may still name it.
        references = _message_ids(_field(message, "references"))
        dsn.original_message_id = _first_id(_field(message, "in-reply-to")) or (
            references[-1] if references else None
        )
    return dsn


def _returned(part: Message) -> Message | None:
    """The returned message, or its headers, from the third part of a report."""
    inner = part.get_payload()
    if isinstance(inner, list):  # the parser reads every message/* type as a message
        return inner[0] if inner and isinstance(inner[0], Message) else None
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    return parser.parsebytes(_leaf_bytes(part))


def _param(message: Message, name: str) -> str | None:
    value = message.get_param(name)
    if isinstance(value, tuple):
        value = email.utils.collapse_rfc2231_value(value)
    return str(value) if value is not None else None


def _field(message: Message, name: str) -> str:
    value = message.get(name)
    return decode_words(str(value))[:MAX_FIELD_CHARS] if value is not None else ""


def _decode_transfer(data: bytes, cte: str) -> bytes:
    """`data` decoded from its Content-Transfer-Encoding, leniently."""
    if cte == "base64":
        cleaned = re.sub(rb"[^A-Za-z0-9+/]", b"", data)
        if len(cleaned) % 4 == 1:
            cleaned = cleaned[:-1]  # a lone trailing character carries no byte
        return base64.b64decode(cleaned + b"=" * (-len(cleaned) % 4))
    if cte == "quoted-printable":
        return quopri.decodestring(data)
    return data


def _cte(part: Message) -> str:
    return str(part.get("content-transfer-encoding", "")).strip().lower()


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")  # 8-bit bytes come back from the parser


def _leaf_bytes(part: Message) -> bytes:
    payload = part.get_payload()
    return _decode_transfer(_raw(payload), _cte(part)) if isinstance(payload, str) else b""


def _status_text(part: Message) -> str:
    """The delivery-status body. The stdlib parser splits it into one Message per field block;
    when the part was transfer-encoded, those "blocks" hold the encoded text instead."""
    payload = part.get_payload()
    if not isinstance(payload, list):
        data = _leaf_bytes(part)
    elif _cte(part) in ("base64", "quoted-printable"):
        encoded = "\n\n".join(
            block.as_string(policy=email.policy.compat32)
            for block in payload
            if isinstance(block, Message)
        )
        data = _decode_transfer(_raw(encoded), _cte(part))
    else:
        data = _raw("\n\n".join(_block_text(b) for b in payload if isinstance(b, Message)))
    return decode_bytes(data, "utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _block_text(block: Message) -> str:
    fields = "\n".join(f"{name}: {value}" for name, value in block.items())
    # message/global-delivery-status is parsed as one message: its first block as headers and
    # the rest as its body.
    rest = block.get_payload()
    return fields + ("\n\n" + rest if isinstance(rest, str) and rest.strip() else "")


def _blocks(text: str) -> list[dict[str, str]]:
    """The field blocks of a delivery-status body: one per message, then one per recipient.
    Names are lowercased; folded values are unfolded."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    name = ""
    for line in text.split("\n"):
        if not line.strip():
            if current:
                blocks.append(current)
            current, name = {}, ""
        elif line[0] in " \t" and name:
            current[name] = (current[name] + " " + line.strip())[:MAX_FIELD_CHARS]
        elif ":" in line:
            name, value = (piece.strip() for piece in line.split(":", 1))
            name = name.lower()
            if name in current:
                name = ""  # a repeated field: the first one counts, with its continuation
            else:
                current[name] = value[:MAX_FIELD_CHARS]
        if len(blocks) > MAX_RECIPIENTS:
            break  # one per-message block, then at most MAX_RECIPIENTS recipients
    if current:
        blocks.append(current)
    return blocks


def _read_status(dsn: Dsn, blocks: list[dict[str, str]]) -> None:
    for block in blocks[: MAX_RECIPIENTS + 1]:
        if "reporting-mta" in block and dsn.reporting_mta is None:
            dsn.reporting_mta = one_line(_typed_value(block["reporting-mta"]), 255) or None
        address = _address(block.get("original-recipient")) or _address(
            block.get("final-recipient")
        )
        if not address:
            continue  # the per-message block, or a recipient block without an address
        action = one_line(block.get("action", ""), 40).lower().split(" ", 1)[0]
        status = re.search(r"\b[245]\.\d{1,3}\.\d{1,3}\b", block.get("status", ""))
        diagnostic = one_line(_typed_value(block.get("diagnostic-code", "")), 10_000)
        dsn.recipients.append(
            DsnRecipient(
                address=address,
                action=action,
                status=status.group(0) if status else "",
                diagnostic=_shorten(diagnostic) or None,
            )
        )


def _typed_value(value: str) -> str:
    """ "rfc822; bob@example.com" → "bob@example.com": the value without its type prefix."""
    kind, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon and re.fullmatch(r"\s*[A-Za-z0-9-]+\s*", kind) else value


def _address(value: str | None) -> str:
    if not value:
        return ""
    words = one_line(_typed_value(value), 1000).split()
    # "rfc822; <bob@example.net> (comment)": the first word, without its brackets.
    address = words[0].strip("<>") if words else ""
    return address if 0 < len(address) <= 320 else ""


def _shorten(text: str) -> str:
    if len(text) <= MAX_DIAGNOSTIC_CHARS:
        return text
    return text[: MAX_DIAGNOSTIC_CHARS - 1].rstrip() + "…"


_MESSAGE_ID = re.compile(r"<([^<>\s\x00-\x1f\x7f]{1,998})>")


def _message_ids(value: str) -> list[str]:
    return _MESSAGE_ID.findall(value)


def _first_id(value: str) -> str | None:
    ids = _message_ids(value)
    if ids:
        return ids[0]
    bare = value.strip()
    return bare if "@" in bare and not re.search(r"[\s<>\x00-\x1f\x7f]", bare) else None


def describe(rcpt: DsnRecipient) -> str:
    """One line for the room about one recipient, e.g.
    "⚠ delivery to bob@example.com failed: 550 5.1.1 user unknown"."""
    address = one_line(rcpt.address, 320) or "(unknown recipient)"
    detail = one_line(rcpt.diagnostic or rcpt.status or "", MAX_DIAGNOSTIC_CHARS)
    suffix = f": {detail}" if detail else ""
    action = one_line(rcpt.action, 40).lower()
    if action == "failed":
        return f"⚠ delivery to {address} failed{suffix}"
    if action == "delayed":
        return f"⏳ delivery to {address} is delayed{suffix}"
    if action == "delivered":
        return f"✓ delivered to {address}{suffix}"
    if action in ("relayed", "expanded"):
        return f"↪ delivery to {address} was {action}{suffix}"
    return f"delivery to {address}: {action or 'unknown status'}{suffix}"
