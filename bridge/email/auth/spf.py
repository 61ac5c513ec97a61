"""SPF (RFC 7208): may this IP address send mail for the MAIL FROM (or HELO) domain?

Implemented here rather than through pyspf, which resolves through dnspython's process-wide
default resolver with the deprecated synchronous ``dns.resolver.query``: pointing it at the
configured servers would mean patching global state, and every check would tie up a thread.
This one asks :class:`~bridge.email.auth.dns.Resolver` directly, so the configured servers,
port and timeout apply and a check can be cancelled at the caller's deadline.

Covered: ``v=spf1`` with ``all``, ``include``, ``a``, ``mx``, ``ptr``, ``ip4``, ``ip6`` and
``exists``, the ``redirect`` modifier, qualifiers, macros, the limits of ten DNS-querying terms
and two void lookups, and whole-record syntax checks. Deliberate simplifications:

- ``ptr`` counts as a DNS-querying term but never matches (RFC 7208 §5.5 says not to publish it;
  it costs a reverse lookup per check), and the ``%{p}`` macro expands to "unknown" (§7.3).
- ``exp=`` is accepted and ignored: explanations are for SMTP rejections, which SPF never causes
  here.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass

from .dns import DnsTempError, Resolver

log = logging.getLogger(__name__)

MAX_DNS_TERMS = 10  # RFC 7208 §4.6.4
MAX_VOID_LOOKUPS = 2
MAX_MX_NAMES = 10

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_DNS_MECHANISMS = ("include", "a", "mx", "ptr", "exists")
_VERSION = re.compile(r"v=spf1(?: |$)", re.IGNORECASE)
_MODIFIER = re.compile(r"([a-z][a-z0-9_.-]*)=(.*)", re.IGNORECASE | re.DOTALL)
_MECHANISM = re.compile(r"([+\-~?]?)([a-z0-9]+)(.*)", re.IGNORECASE | re.DOTALL)
# Lazy domain-spec so that trailing "/24" and "//64" are read as CIDR lengths.
_DUAL_CIDR = re.compile(r"(?::(?P<spec>.+?))?(?:/(?P<v4>\d+))?(?://(?P<v6>\d+))?")
_MACRO = re.compile(r"%\{([a-z])(\d*)(r?)([.\-+,/_=]*)\}", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.IGNORECASE)
_TOPLABEL = re.compile(r"[a-z0-9-]*[a-z][a-z0-9-]*", re.IGNORECASE)


@dataclass(frozen=True)
class SpfResult:
    result: str  # pass | fail | softfail | neutral | none | temperror | permerror
    domain: str | None  # the domain whose policy was (or would have been) checked


class _PermError(Exception):
    pass


@dataclass(frozen=True)
class _Term:
    qualifier: str
    name: str
    spec: str | None = None  # domain-spec (unexpanded) for a, mx, include, exists, ptr
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None  # ip4, ip6
    cidr4: int = 32
    cidr6: int = 128


@dataclass(frozen=True)
class _Record:
    terms: list[_Term]
    redirect: str | None


def identity(mail_from: str, helo: str) -> tuple[str, str]:
    """(local part, domain) that SPF checks: the MAIL FROM, or postmaster@HELO for "<>"."""
    sender = mail_from.strip().strip("<>").strip()
    local, at, domain = sender.rpartition("@")
    if not at or not domain:
        local, domain = "postmaster", helo.strip()
    return (local or "postmaster"), domain.lower().rstrip(".")


def _valid_domain(domain: str) -> bool:
    labels = domain.split(".")
    return (
        len(labels) >= 2
        and len(domain) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and _TOPLABEL.fullmatch(labels[-1]) is not None
    )


async def check_spf(resolver: Resolver, *, ip: str, mail_from: str, helo: str) -> SpfResult:
    """check_host() for the connecting ``ip`` and the sender identity; never raises DNS errors."""
    local, domain = identity(mail_from, helo)
    if not _valid_domain(domain):
        return SpfResult("none", domain or None)  # §4.3: a malformed identity has no policy
    try:
        address = ipaddress.ip_address(ip.strip().strip("[]").partition("%")[0])
    except ValueError:
        return SpfResult("none", domain)  # no usable client address (e.g. a Unix socket peer)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped  # a dual-stack socket's view of an IPv4 client
    check = _Check(resolver, address, local, domain, helo.strip().lower())
    try:
        return SpfResult(await check.check_host(domain), domain)
    except DnsTempError:
        return SpfResult("temperror", domain)
    except _PermError as e:
        log.debug("SPF permerror for %s: %s", domain, e)
        return SpfResult("permerror", domain)


class _Check:
    """One evaluation: the client, the sender, and the lookup counters shared by its includes."""

    def __init__(
        self,
        resolver: Resolver,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        local: str,
        sender_domain: str,
        helo: str,
    ) -> None:
        self.resolver = resolver
        self.ip = ip
        self.local = local
        self.sender_domain = sender_domain
        self.helo = helo
        self.dns_terms = 0
        self.void_lookups = 0

    async def check_host(self, domain: str) -> str:
        if not _valid_domain(domain):
            return "none"
        records = [r for r in await self.resolver.txt(domain) if _VERSION.match(r)]
        if not records:
            return "none"
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records")
        record = _parse(records[0])
        for term in record.terms:
            if await self._matches(term, domain):
                return _QUALIFIERS[term.qualifier]
        # §6.1: redirect only applies when no "all" could have ended the evaluation.
        if record.redirect is not None and not any(t.name == "all" for t in record.terms):
            self._count_dns_term()
            result = await self.check_host(self._expand(record.redirect, domain))
            if result == "none":
                raise _PermError(f"redirect from {domain} leads to no SPF record")
            return result
        return "neutral"

    def _count_dns_term(self) -> None:
        self.dns_terms += 1
        if self.dns_terms > MAX_DNS_TERMS:
            raise _PermError(f"more than {MAX_DNS_TERMS} DNS-querying terms")

    def _void(self, answers: list) -> list:
        if not answers:
            self.void_lookups += 1
            if self.void_lookups > MAX_VOID_LOOKUPS:
                raise _PermError(f"more than {MAX_VOID_LOOKUPS} void lookups")
        return answers

    async def _matches(self, term: _Term, domain: str) -> bool:
        if term.name == "all":
            return True
        if term.name in ("ip4", "ip6"):
            return term.network is not None and self.ip in term.network
        self._count_dns_term()
        target = self._expand(term.spec, domain) if term.spec else domain
        if term.name == "include":
            result = await self.check_host(target)
            if result == "none":
                raise _PermError(f"include:{target} has no SPF record")
            return result == "pass"
        if term.name == "exists":
            return bool(self._void(await self.resolver.a(target)))
        if term.name == "a":
            found = self._void(await self.resolver.addresses(target, self.ip.version))
            return self._in_any(found, term)
        if term.name == "mx":
            return await self._mx_matches(target, term)
        return False  # ptr: counted above, deliberately never matched

    async def _mx_matches(self, target: str, term: _Term) -> bool:
        exchanges = self._void(await self.resolver.mx(target))
        if len(exchanges) > MAX_MX_NAMES:
            raise _PermError(f"{target} has more than {MAX_MX_NAMES} MX records")
        for exchange in exchanges:
            if exchange in ("", "."):
                continue  # a null MX (RFC 7505) names no host
            if self._in_any(await self.resolver.addresses(exchange, self.ip.version), term):
                return True
        return False

    def _in_any(self, addresses: list[str], term: _Term) -> bool:
        prefix = term.cidr4 if self.ip.version == 4 else term.cidr6
        return any(
            self.ip in ipaddress.ip_network(f"{address}/{prefix}", strict=False)
            for address in addresses
        )

    def _expand(self, spec: str, domain: str) -> str:
        values = {
            "s": f"{self.local}@{self.sender_domain}",
            "l": self.local,
            "o": self.sender_domain,
            "d": domain,
            "i": _dotted_ip(self.ip),
            "p": "unknown",
            "v": "in-addr" if self.ip.version == 4 else "ip6",
            "h": self.helo,
        }
        expanded = expand_macros(spec, values).rstrip(".")
        # §7.3: over-long results lose labels from the left until they fit.
        while len(expanded) > 253 and "." in expanded:
            expanded = expanded.split(".", 1)[1]
        return expanded.lower()


def _dotted_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if ip.version == 4:
        return str(ip)
    return ".".join(ip.exploded.replace(":", ""))  # §7.3: one label per nibble


def expand_macros(spec: str, values: dict[str, str]) -> str:
    """Expand a domain-spec's macros; ``values`` maps the letters that may appear in it."""
    out: list[str] = []
    pos = 0
    while pos < len(spec):
        char = spec[pos]
        if char != "%":
            out.append(char)
            pos += 1
            continue
        follower = spec[pos + 1 : pos + 2]
        if follower in ("%", "_", "-"):
            out.append({"%": "%", "_": " ", "-": "%20"}[follower])
            pos += 2
            continue
        match = _MACRO.match(spec, pos)
        if not match or match.group(1).lower() not in values:
            raise _PermError(f"bad macro in {spec!r}")
        letter, digits, reverse, delimiters = match.groups()
        parts = re.split("[" + re.escape(delimiters or ".") + "]", values[letter.lower()])
        if reverse:
            parts.reverse()
        if digits:
            if int(digits) == 0:
                raise _PermError(f"zero-length macro transformer in {spec!r}")
            parts = parts[-int(digits) :]
        out.append(".".join(parts))
        pos = match.end()
    return "".join(out)


def _parse(text: str) -> _Record:
    """Parse a whole record first: §4.6 makes any syntax error a permerror before evaluation."""
    terms: list[_Term] = []
    modifiers: dict[str, str] = {}
    for word in text.split(" ")[1:]:
        if not word:
            continue
        modifier = _MODIFIER.fullmatch(word)
        if modifier:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in modifiers and name in ("redirect", "exp"):
                raise _PermError(f"duplicate {name}= modifier")
            if name == "redirect":
                _check_domain_spec(value)
            modifiers[name] = value
            continue
        terms.append(_parse_mechanism(word))
    return _Record(terms, modifiers.get("redirect"))


def _parse_mechanism(word: str) -> _Term:
    match = _MECHANISM.fullmatch(word)
    if not match or match.group(2).lower() not in _MECHANISMS:
        raise _PermError(f"unknown SPF term {word!r}")
    qualifier, name, rest = match.group(1) or "+", match.group(2).lower(), match.group(3)
    if name == "all":
        if rest:
            raise _PermError(f"bad term {word!r}")
        return _Term(qualifier, name)
    if name in ("ip4", "ip6"):
        return _Term(qualifier, name, network=_parse_network(name, rest))
    if name in ("include", "exists"):
        if not rest.startswith(":") or len(rest) < 2:
            raise _PermError(f"{name} needs a domain: {word!r}")
        return _Term(qualifier, name, spec=_check_domain_spec(rest[1:]))
    if name == "ptr":
        spec = rest[1:] if rest.startswith(":") else None
        if rest and not spec:
            raise _PermError(f"bad term {word!r}")
        return _Term(qualifier, name, spec=_check_domain_spec(spec) if spec else None)
    cidr = _DUAL_CIDR.fullmatch(rest)  # a, mx
    if not cidr:
        raise _PermError(f"bad term {word!r}")
    v4, v6 = int(cidr.group("v4") or 32), int(cidr.group("v6") or 128)
    if v4 > 32 or v6 > 128:
        raise _PermError(f"bad CIDR length in {word!r}")
    spec = cidr.group("spec")
    return _Term(
        qualifier, name, spec=_check_domain_spec(spec) if spec else None, cidr4=v4, cidr6=v6
    )


def _parse_network(name: str, rest: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if not rest.startswith(":"):
        raise _PermError(f"{name} needs an address")
    address, slash, prefix = rest[1:].partition("/")
    if slash and not prefix.isdigit():
        raise _PermError(f"bad {name} prefix in {rest!r}")
    try:
        if name == "ip4":
            return ipaddress.IPv4Network(f"{address}/{prefix or 32}", strict=False)
        return ipaddress.IPv6Network(f"{address}/{prefix or 128}", strict=False)
    except ValueError:
        raise _PermError(f"bad {name} network {rest[1:]!r}") from None


def _check_domain_spec(spec: str) -> str:
    """Reject syntactically invalid domain-specs at parse time (§4.6: the whole record fails)."""
    # Expanding with placeholder values validates the macros themselves.
    placeholder = {c: "x" for c in "slodipvh"}
    expanded = expand_macros(spec, placeholder).rstrip(".")
    if "%" not in spec:
        labels = expanded.split(".")
        if not all(labels) or not _TOPLABEL.fullmatch(labels[-1]):
            raise _PermError(f"bad domain {spec!r}")
    return spec
