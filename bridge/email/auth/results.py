"""Reading an Authentication-Results header (RFC 8601) written by an MTA we trust.

Behind an MTA that already checked SPF, DKIM and DMARC, we take its word instead of checking
again (and instead of checking the MTA's own address against the sender's SPF policy, which
would fail). Only a header carrying the configured authserv-id is believed: anyone can write an
Authentication-Results header into a message, and a trusted MTA is expected to remove copies of
its own id that arrive from outside (RFC 8601 §5).

The parser is tolerant: comments are set aside (they are kept per result, since common MTAs put
"p=reject" there), unknown methods and properties are skipped, and a result it cannot read
leaves that method out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .dmarc import POLICIES, organizational_domain

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
DKIM_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
DMARC_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
# Older or vendor spellings, mapped onto the results our verdict uses.
_ALIASES = {"hardfail": "fail", "policy": "fail", "neutral": "fail", "error": "temperror"}
_POLICY = re.compile(r"\b(s?p)\s*=\s*([a-z]+)", re.IGNORECASE)


@dataclass(frozen=True)
class MethodResult:
    method: str  # lower case, without a method version
    result: str  # lower case, as written
    reason: str | None = None
    properties: dict[str, str] = field(default_factory=dict)  # "header.d" → "example.com"
    comments: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AuthResults:
    authserv_id: str
    results: list[MethodResult]

    def of(self, method: str) -> list[MethodResult]:
        return [r for r in self.results if r.method == method]


def _tokens(value: str) -> list[tuple[str, str]]:
    """Split into ("word"|"string"|"comment"|";"|"=", text), honouring quotes and comments."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c.isspace():
            i += 1
        elif c in ";=":
            tokens.append((c, c))
            i += 1
        elif c == '"':
            text, i = _quoted(value, i + 1)
            tokens.append(("string", text))
        elif c == "(":
            text, i = _comment(value, i + 1)
            tokens.append(("comment", text))
        else:
            start = i
            while i < n and not value[i].isspace() and value[i] not in ';="()':
                i += 1
            tokens.append(("word", value[start:i]))
            i = max(i, start + 1)  # a stray ")" is skipped rather than looped on
    return tokens


def _quoted(value: str, i: int) -> tuple[str, int]:
    out = []
    while i < len(value) and value[i] != '"':
        if value[i] == "\\" and i + 1 < len(value):
            i += 1
        out.append(value[i])
        i += 1
    return "".join(out), i + 1


def _comment(value: str, i: int) -> tuple[str, int]:
    depth, start = 1, i
    while i < len(value) and depth:
        if value[i] == "\\":
            i += 1
        elif value[i] == "(":
            depth += 1
        elif value[i] == ")":
            depth -= 1
        i += 1
    return value[start : i - 1 if depth == 0 else i], i


def parse(value: str) -> AuthResults | None:
    """Parse one header value; None when it does not even start with an authserv-id."""
    tokens = _tokens(value)
    head, pos = _until_semicolon(tokens, 0)
    head = [t for t in head if t[0] != "comment"]
    if not head or head[0][0] not in ("word", "string"):
        return None
    results = []
    while pos < len(tokens):
        segment, pos = _until_semicolon(tokens, pos + 1)
        result = _resinfo(segment)
        if result is not None:
            results.append(result)
    return AuthResults(head[0][1], results)


def _until_semicolon(tokens: list[tuple[str, str]], pos: int) -> tuple[list, int]:
    end = pos
    while end < len(tokens) and tokens[end][0] != ";":
        end += 1
    return tokens[pos:end], end


def _resinfo(segment: list[tuple[str, str]]) -> MethodResult | None:
    comments = [text for kind, text in segment if kind == "comment"]
    items = [t for t in segment if t[0] != "comment"]
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(items):
        if (
            i + 2 < len(items)
            and items[i][0] == "word"
            and items[i + 1][0] == "="
            and items[i + 2][0] in ("word", "string")
        ):
            pairs.append((items[i][1].lower(), items[i + 2][1]))
            i += 3
        else:
            i += 1  # something unreadable: skip it and look for the next name=value
    if not pairs:
        return None  # e.g. the "none" of a header reporting no results
    method, result = pairs[0]
    reason = None
    properties: dict[str, str] = {}
    for name, val in pairs[1:]:
        if name == "reason":
            reason = val
        elif "." in name:
            properties.setdefault(name, val)
    return MethodResult(method.split("/")[0].strip(), result.lower(), reason, properties, comments)


def find_trusted(values: list[str], authserv_id: str) -> AuthResults | None:
    """The topmost header (``values`` in message order) from ``authserv_id``, if any."""
    wanted = authserv_id.strip().lower()
    for value in values:
        parsed = parse(value)
        if parsed is not None and parsed.authserv_id.lower() == wanted:
            return parsed
    return None


def _normalise(result: str, allowed: tuple[str, ...]) -> str:
    result = _ALIASES.get(result, result) if result not in allowed else result
    return result if result in allowed else "permerror"


def _domain(value: str | None) -> str | None:
    if not value:
        return None
    return value.rpartition("@")[2].strip().lower().rstrip(".") or None


def spf_of(results: AuthResults) -> tuple[str, str | None]:
    """(result, checked domain) of the first spf= entry, ("none", None) without one."""
    for entry in results.of("spf"):
        domain = entry.properties.get("smtp.mailfrom") or entry.properties.get("smtp.helo")
        return _normalise(entry.result, SPF_RESULTS), _domain(domain)
    return "none", None


def dkim_of(results: AuthResults) -> tuple[str, list[str]]:
    """(result, d= of passing signatures): pass if any passed, else the most telling failure."""
    entries = [(_normalise(e.result, DKIM_RESULTS), e) for e in results.of("dkim")]
    passed = [
        _domain(e.properties.get("header.d") or e.properties.get("header.i"))
        for result, e in entries
        if result == "pass"
    ]
    if passed:
        return "pass", list(dict.fromkeys(d for d in passed if d))
    seen = {result for result, _ in entries}
    for result in ("fail", "temperror", "permerror"):
        if result in seen:
            return result, []
    return "none", []


def dmarc_of(results: AuthResults) -> tuple[str, str | None, str | None]:
    """(result, effective policy, header.from domain) of the first dmarc= entry."""
    for entry in results.of("dmarc"):
        author = _domain(entry.properties.get("header.from"))
        return _normalise(entry.result, DMARC_RESULTS), _policy(entry, author), author
    return "none", None, None


def _policy(entry: MethodResult, author: str | None) -> str | None:
    explicit = entry.properties.get("policy.dmarc", "").lower()
    if explicit in POLICIES:
        return explicit
    # Otherwise "p=reject sp=none" style text, in the reason or (OpenDMARC, Gmail) a comment.
    found: dict[str, str] = {}
    for text in [entry.reason or "", *entry.comments]:
        for tag, value in _POLICY.findall(text):
            if value.lower() in POLICIES:
                found.setdefault(tag.lower(), value.lower())
    subdomain = author is not None and organizational_domain(author) != author
    if subdomain and "sp" in found:
        return found["sp"]
    return found.get("p")
