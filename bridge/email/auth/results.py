"""Reading an Authentication-Results header (RFC 8601) written by an MTA we trust.

Behind an MTA that already checked SPF, DKIM and DMARC, we take its word instead of checking
again (and instead of checking the MTA's own address against the sender's SPF policy, which
would fail). Only a header carrying the configured authserv-id is believed: anyone can write an
Authentication-Results header into a message, and a trusted MTA is expected to remove copies of
its own id that arrive from outside (RFC 8601 §5).

The grammar is the ``authres`` library's, not ours (a hand-written tokenizer once read
``dmarc / 1 = fail`` as a method called "1"). It drops comments, and common MTAs put the DMARC
policy in one ("p=reject"), so a small subclass keeps each result's top-level comments. A header
``authres`` cannot read is not believed at all; unknown methods and properties are carried along
and simply never asked for.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import authres
import authres.core

from .dmarc import POLICIES, organizational_domain

log = logging.getLogger("bridge.email.auth")

SPF_RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
DKIM_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
DMARC_RESULTS = ("pass", "fail", "none", "temperror", "permerror")
# Older or vendor spellings, mapped onto the results our verdict uses.
_ALIASES = {"hardfail": "fail", "policy": "fail", "neutral": "fail", "error": "temperror"}
_POLICY = re.compile(r"\b(s?p)\s*=\s*([a-z]+)", re.IGNORECASE)
# authres re-scans the rest of the text at every token (quadratic); real headers are a few
# hundred bytes, so a longer one is not read (it is then not believed).
MAX_VALUE_LENGTH = 16 * 1024


@dataclass(frozen=True)
class MethodResult:
    method: str  # lower case, without a method version
    result: str  # lower case, as written
    reason: str | None = None
    properties: dict[str, str] = field(default_factory=dict)  # "header.d" → "example.com"
    comments: list[str] = field(default_factory=list)
    version: str | None = None  # the method version ("dkim/1"), if written


@dataclass(frozen=True)
class AuthResults:
    authserv_id: str
    results: list[MethodResult]

    def of(self, method: str) -> list[MethodResult]:
        return [r for r in self.results if r.method == method]


class _CommentKeepingHeader(authres.core.AuthenticationResultsHeader):
    """authres' parser, remembering the top-level comments inside each resinfo, and with CFWS
    read correctly (authres 1.2 stops at the space after a comment when one preceded it, so
    RFC 8601 B.7's ``dkim (…) / 1 (…) = (…) fail`` failed to parse)."""

    def _parse_rfc5322_cfws(self) -> bool:
        found = False
        while True:
            fws = self._parse_pattern(authres.core.RFC5322_FWS_PATTERN)
            comment = self._parse_rfc5322_comment()
            if not fws and not comment:
                return found
            found = True

    def _parse_resinfo(self) -> Any:
        self._comments: list[str] = []
        self._depth = 0
        result = super()._parse_resinfo()
        if isinstance(result, authres.core.AuthenticationResult):
            result.cloakroom_comments = self._comments
        return result

    def _parse_rfc5322_comment(self) -> Any:
        before = self._parse_text
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            found = super()._parse_rfc5322_comment()
        finally:
            self._depth -= 1
        if found and self._depth == 0 and hasattr(self, "_comments"):
            text = before[: len(before) - len(self._parse_text)].strip()
            self._comments.append(text[1:-1])  # without the outer parentheses
        return found


_FEATURES = authres.FeatureContext()
_FEATURES.header_class = _CommentKeepingHeader


def parse(value: str) -> AuthResults | None:
    """Parse one (unfolded) header value; None when it is not a readable header."""
    if len(value) > MAX_VALUE_LENGTH:
        return None
    try:
        header = _FEATURES.parse_value(value)
    except (authres.core.AuthResError, RecursionError, ValueError, AttributeError) as e:
        log.debug("Unreadable Authentication-Results header: %s", type(e).__name__)
        return None
    results = []
    for r in header.results:
        if not isinstance(r, authres.core.AuthenticationResult):
            continue  # a "none" after real results
        properties: dict[str, str] = {}
        for prop in r.properties or []:
            properties.setdefault(f"{prop.type}.{prop.name}".lower(), _unquote(str(prop.value)))
        results.append(
            MethodResult(
                method=str(r.method).lower(),
                result=str(r.result).lower(),
                reason=None if r.reason is None else _unquote(str(r.reason)),
                properties=properties,
                comments=list(getattr(r, "cloakroom_comments", [])),
                version=r.version,
            )
        )
    return AuthResults(header.authserv_id, results)


def _unquote(value: str) -> str:
    # authres keeps a quoted-string's quoted-pairs as written; a token cannot hold a backslash.
    return re.sub(r"\\(.)", r"\1", value)


def find_trusted(values: list[str], authserv_id: str) -> AuthResults | None:
    """The topmost header (``values`` in message order) from ``authserv_id``, if any."""
    wanted = authserv_id.strip().lower()
    # Only headers that start with the id are parsed at all: the others cost nothing.
    starts = re.compile(r"\s*(?:\([^()]*\)\s*)*" + re.escape(wanted) + r"(?![\w.-])", re.I)
    for value in values:
        if not starts.match(value):
            continue
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
