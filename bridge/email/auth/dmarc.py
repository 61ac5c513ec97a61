"""DMARC (RFC 7489): does an authenticated identity match the domain the reader sees in From?

SPF and DKIM each authenticate *some* domain; only DMARC ties one of them to the RFC5322.From
address, and only the From address is shown to users.

Choices where the RFC leaves room:

- The author must be exactly one address in exactly one From field. Anything else (no From,
  two From fields, a list of addresses, unparsable) is ``permerror``: such a message has no single
  author to vouch for, and "none" would wrongly suggest the domain simply publishes no policy.
- A ``pct=`` below 100 is applied as if this message fell outside the sample: the next milder
  policy (reject → quarantine → none). Deterministic, and never harsher than the domain asked.
- The organizational domain comes from the public suffix list (bundled with publicsuffixlist,
  read once, never downloaded at run time).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from email.utils import getaddresses

from publicsuffixlist import PublicSuffixList

from .dkim import DkimResult
from .dns import DnsTempError, Resolver
from .spf import SpfResult

POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(?:;|$)", re.IGNORECASE)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class AuthorError(Exception):
    """The message has no single RFC5322.From domain to evaluate."""


@functools.cache
def _public_suffixes() -> PublicSuffixList:
    return PublicSuffixList()  # ~0.2 s to load, so once per process and only when needed


def organizational_domain(domain: str) -> str:
    """The registrable domain (RFC 7489 §3.2): mail.example.co.uk → example.co.uk."""
    domain = domain.lower().rstrip(".")
    return _public_suffixes().privatesuffix(domain) or domain


def author_domain(from_fields: list[str]) -> str:
    """The domain of the one From address; raises :class:`AuthorError` otherwise."""
    return author(from_fields)[1]


def author(from_fields: list[str]) -> tuple[str, str]:
    """(address, domain as A-labels) of the one From address; :class:`AuthorError` otherwise."""
    if len(from_fields) != 1:
        raise AuthorError(f"{len(from_fields)} From header fields")
    addresses = [address for _, address in getaddresses(from_fields) if address]
    if len(addresses) != 1:
        raise AuthorError(f"{len(addresses)} From addresses")
    _, at, domain = addresses[0].rpartition("@")
    domain = normal_domain(domain)
    if domain is None or not at:
        raise AuthorError("the From address has no valid domain")
    return addresses[0], domain


def normal_domain(domain: str) -> str | None:
    """A domain as DMARC compares it: lower case, A-labels, no final dot; None if invalid."""
    domain = domain.strip().lower().rstrip(".")
    try:
        domain = domain.encode("idna").decode("ascii")  # an SMTPUTF8 domain → its A-labels
    except UnicodeError:
        return None
    if not domain or not all(_LABEL.fullmatch(label) for label in domain.split(".")):
        return None
    return domain


@dataclass(frozen=True)
class DmarcRecord:
    policy: str
    subdomain_policy: str | None
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100

    @classmethod
    def parse(cls, text: str) -> DmarcRecord | None:
        """None for a record that must be ignored (RFC 7489 §6.6.3 step 6)."""
        tags: dict[str, str] = {}
        for part in text.split(";"):
            name, eq, value = part.partition("=")
            if eq:
                tags.setdefault(name.strip().lower(), value.strip())
        policy = tags.get("p", "").lower()
        subdomain_policy = tags.get("sp", "").lower() or None
        if policy not in POLICIES or subdomain_policy not in (None, *POLICIES):
            if not tags.get("rua"):
                return None
            # A broken policy with a report address reads as monitoring only (p=none).
            policy, subdomain_policy = "none", None
        pct = tags.get("pct", "100")
        return cls(
            policy=policy,
            subdomain_policy=subdomain_policy,
            adkim="s" if tags.get("adkim", "").lower() == "s" else "r",
            aspf="s" if tags.get("aspf", "").lower() == "s" else "r",
            pct=int(pct) if pct.isdigit() and int(pct) <= 100 else 100,
        )


@dataclass(frozen=True)
class Discovery:
    """The outcome of policy discovery for one author domain."""

    record: DmarcRecord | None = None
    at_organizational_domain: bool = False
    temperror: bool = False

    @property
    def effective_policy(self) -> str | None:
        if self.record is None:
            return None
        policy = self.record.policy
        if self.at_organizational_domain:  # so the author domain is a subdomain: sp= applies
            policy = self.record.subdomain_policy or policy
        return policy if self.record.pct >= 100 else _MILDER[policy]


async def _records(resolver: Resolver, domain: str) -> list[str]:
    return [r for r in await resolver.txt(f"_dmarc.{domain}") if _VERSION.match(r)]


async def discover(resolver: Resolver, domain: str) -> Discovery:
    """Find the policy at _dmarc.<domain>, else at _dmarc.<organizational domain>."""
    try:
        records = await _records(resolver, domain)
        at_org = False
        if not records:
            org = organizational_domain(domain)
            if org != domain:
                records, at_org = await _records(resolver, org), True
    except DnsTempError:
        return Discovery(temperror=True)
    if len(records) != 1:
        return Discovery()  # none, or several: §6.6.3 says DMARC then does not apply
    return Discovery(DmarcRecord.parse(records[0]), at_org)


def aligned(domain: str, author: str, mode: str) -> bool:
    domain, author = domain.lower().rstrip("."), author.lower().rstrip(".")
    if mode == "s":
        return domain == author
    return organizational_domain(domain) == organizational_domain(author)


def evaluate(
    author: str, discovery: Discovery, spf: SpfResult, dkim: DkimResult
) -> tuple[str, str | None]:
    """(dmarc result, effective policy) from the discovered policy and the SPF/DKIM outcomes."""
    if discovery.temperror:
        return "temperror", None
    record = discovery.record
    if record is None:
        return "none", None
    dkim_ok = dkim.result == "pass" and any(aligned(d, author, record.adkim) for d in dkim.domains)
    spf_ok = (
        spf.result == "pass" and spf.domain is not None and aligned(spf.domain, author, record.aspf)
    )
    return ("pass" if dkim_ok or spf_ok else "fail"), discovery.effective_policy
