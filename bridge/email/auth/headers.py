"""The one reading of a message's header section that sender checks and the reader both rely on.

Three parsers look at every inbound message: ours (for DMARC's From and the trusted
Authentication-Results), dkimpy (which splits lines on ``\\r?\\n``) and the standard library's
email package, which builds what the user sees and also breaks lines at a bare CR, ``\\x0b``,
``\\x0c`` and ``\\x1c``–``\\x1e`` (``str.splitlines``), and ends the header section at the first
line that is not a header field. Where they disagree, an attacker can have one parser authenticate
one From while the reader is shown another. So a header section is accepted only when every
parser must read it the same way, and refused at DATA otherwise (``550 5.6.0``; the sender's
server bounces it, nothing is lost silently):

- every line ends in CRLF and holds no other line-break character;
- every line is a header field (``name:`` with a printable-ASCII name and no space before the
  colon) or the continuation of one (it starts with a space or tab), up to the empty line;
- exactly one From field (RFC 5322 §3.6 requires it, and DMARC is undefined without it);
- at most ``max_size`` bytes (a header section is small; a huge one is someone making us work).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Lines of the header section are separated by CRLF and nothing else.
_FOREIGN_BREAK = re.compile(rb"[\r\n\x0b\x0c\x1c-\x1e]")
# field-name = 1*ftext, ftext = %d33-57 / %d59-126 (RFC 5322 §3.6.8): no space before the colon.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
END = b"\r\n\r\n"

MALFORMED = "550 5.6.0 Malformed header section"
DEFAULT_MAX_HEADER_SIZE = 1024 * 1024


@dataclass(frozen=True)
class HeaderSection:
    """The fields in message order: (lower-case name, unfolded value without outer spaces)."""

    fields: tuple[tuple[str, str], ...]
    size: int  # bytes of the header section, without the empty line that ends it

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [value for field, value in self.fields if field == name]

    def first(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None


def header_end(raw: bytes, limit: int | None = None) -> int:
    """Where the header section ends (before its empty line); len(raw) when it has no body."""
    if raw.startswith(b"\r\n"):
        return 0
    end = raw.find(END, 0, None if limit is None else limit + len(END))
    if end >= 0:
        return end
    return len(raw) if limit is None or len(raw) <= limit else limit + 1


def read_header_section(
    raw: bytes, *, max_size: int = DEFAULT_MAX_HEADER_SIZE
) -> HeaderSection | str:
    """The header section, or the SMTP refusal (a status line) for one we will not read."""
    end = header_end(raw, max_size)
    if end > max_size:
        return f"552 5.3.4 Header section too big (the limit is {max_size} bytes)"
    block = raw[:end]
    if block.endswith(b"\r\n"):
        block = block[:-2]  # a message without a body: its last field's own CRLF
    if _FOREIGN_BREAK.search(block.replace(b"\r\n", b"")):
        return (
            f"{MALFORMED}: a header line ends in a bare CR or LF, or holds another "
            "line-break character; lines must end in CRLF (RFC 5322 §2.2)"
        )
    fields: list[tuple[str, bytes]] = []
    for number, line in enumerate(block.split(b"\r\n") if block else [], start=1):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + line)  # RFC 5322 unfolding: drop the CRLF only
            continue
        match = _FIELD.match(line)
        if match is None:
            return f"{MALFORMED}: line {number} is not a header field (RFC 5322 §2.2)"
        fields.append((line[: match.end() - 1].decode("ascii").lower(), line[match.end() :]))
    section = HeaderSection(
        tuple((name, value.decode("utf-8", "replace").strip()) for name, value in fields), end
    )
    count = len(section.all("from"))
    if count != 1:
        return (
            f"{MALFORMED}: a message must have exactly one From header field, this one has "
            f"{count} (RFC 5322 §3.6)"
        )
    return section
