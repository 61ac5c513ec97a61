"""Who really sent a message: the verdict, and the :class:`Authenticator` that reaches it.

A check never raises and never holds mail for long. Without DNS (the offline quickstart, an
outage) every lookup gives up after ``dns_timeout`` and the verdict is *temperror*: the mail is
still delivered, with a marker telling the reader the sender could not be verified. The SPF, DKIM
key and DMARC policy lookups run concurrently, each bounded by a few times ``dns_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import dns.inet

from bridge.config import Config, ConfigError

from .dkim import DkimResult, check_dkim
from .dmarc import (
    AuthorError,
    Discovery,
    author,
    discover,
    evaluate,
    normal_domain,
    organizational_domain,
)
from .dns import Resolver
from .headers import HeaderSection, read_header_section
from .results import AuthResults, dkim_of, dmarc_of, find_trusted, spf_of
from .spf import SpfResult, check_spf, identity

log = logging.getLogger("bridge.email.auth")

# The DNS part of one SPF evaluation (up to ten lookups, plus MX hosts) may take this many
# dns_timeouts in all; lookups answered promptly never come near it.
BUDGET_FACTOR = 3
_T = TypeVar("_T")


@dataclass(frozen=True)
class AuthConfig:
    dns_servers: list[str]  # empty: the system's resolver
    dns_port: int = 53
    dns_timeout: float = 2.0
    trusted_authserv_id: str = ""
    reject_dmarc_failures: bool = True

    @classmethod
    def from_config(cls, config: Config) -> AuthConfig:
        servers = [str(s).strip() for s in config["email.auth.dns_servers"] or []]
        for server in servers:
            if not dns.inet.is_address(server):
                raise ConfigError("email.auth.dns_servers", f"{server!r} is not an IP address")
        return cls(
            dns_servers=servers,
            dns_port=int(config["email.auth.dns_port"]),
            dns_timeout=float(config["email.auth.dns_timeout"]),
            trusted_authserv_id=str(config["email.auth.trusted_authserv_id"] or "").strip(),
            reject_dmarc_failures=bool(config["email.auth.reject_dmarc_failures"]),
        )


@dataclass(frozen=True)
class AuthVerdict:
    from_domain: str | None  # the domain of from_address: what SPF/DKIM/DMARC were tied to
    spf: str  # pass | fail | softfail | neutral | none | temperror | permerror
    spf_domain: str | None
    dkim: str  # pass | fail | none | temperror | permerror
    dkim_domains: list[str]  # d= of the signatures that verified
    dmarc: str  # pass | fail | none | temperror | permerror
    dmarc_policy: str | None  # none | quarantine | reject, as it applies to from_domain
    source: str  # checked | trusted-header
    from_address: str | None = None  # the one RFC5322.From address this verdict is about

    @classmethod
    def unverified(cls, from_domain: str | None = None) -> AuthVerdict:
        """The verdict when checking itself went wrong: nothing known, nothing refused."""
        return cls(from_domain, "temperror", None, "temperror", [], "temperror", None, "checked")

    @property
    def authenticated(self) -> bool:
        """Whether from_domain is proven. Says nothing about any other address: see vouches_for."""
        # Without a DMARC record, a valid DKIM signature by the From domain itself still proves
        # the From address (most small domains sign but publish no DMARC policy).
        if self.dmarc == "none" and self.from_domain:
            return self.from_domain.lower() in (d.lower() for d in self.dkim_domains)
        return self.dmarc == "pass"

    def vouches_for(self, address: str) -> bool:
        """Whether the address a reader is shown is one this verdict proves (by its domain)."""
        return self.authenticated and _same_domain(address, self.from_domain)

    @property
    def should_reject(self) -> bool:
        return self.dmarc == "fail" and self.dmarc_policy == "reject"

    def standing(self, shown_address: str) -> str:
        """What the reader should be told about the address shown: ``proven``; ``failed`` (a
        check said no — SPF or DKIM fail, DMARC fail, or the shown domain is not the checked
        one: the shapes of forgery, warned about on every message); or ``unverified`` (nothing
        proves it, nothing contradicts it: no signature, no policy, no DNS answer)."""
        if self.vouches_for(shown_address):
            return "proven"
        if self.from_domain and not _same_domain(shown_address, self.from_domain):
            return "failed"
        if "fail" in (self.spf, self.dkim, self.dmarc):
            return "failed"
        return "unverified"

    def marker(self, shown_address: str) -> str | None:
        """A line for readers when the address they are shown is not proven; None when it is."""
        if self.vouches_for(shown_address):
            return None
        if self.from_domain and not _same_domain(shown_address, self.from_domain):
            # Shown as one domain, checked as another: the shape of an impersonation, so the
            # warning says so plainly, even when the other domain's check passed.
            return (
                f"⚠⚠ WARNING: shown as from {shown_address}, but the sender check was about "
                f"{self.from_address or self.from_domain}; nothing proves this came from "
                f"{shown_address}. Treat it as a likely forgery."
            )
        return f"⚠ could not verify that this came from {shown_address} ({self._reason()})"

    def _reason(self) -> str:
        if self.dmarc == "temperror":
            return "no DNS answer"
        if self.dmarc == "fail":
            return "DMARC: fail"
        parts = [f"DMARC: {self.dmarc}"]
        parts += [f"SPF: {self.spf}"] if self.spf != "none" else []
        parts += [f"DKIM: {self.dkim}"] if self.dkim != "none" else []
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AuthVerdict:
        # Lenient, so rows queued by an older version still load.
        return cls(
            from_domain=data.get("from_domain"),
            spf=data.get("spf", "none"),
            spf_domain=data.get("spf_domain"),
            dkim=data.get("dkim", "none"),
            dkim_domains=list(data.get("dkim_domains") or []),
            dmarc=data.get("dmarc", "none"),
            dmarc_policy=data.get("dmarc_policy"),
            source=data.get("source", "checked"),
            from_address=data.get("from_address"),
        )


def _same_domain(address: str, domain: str | None) -> bool:
    if not domain:
        return False
    shown = normal_domain(address.rpartition("@")[2]) if "@" in address else None
    return shown is not None and shown == normal_domain(domain)


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.resolver = Resolver(config.dns_servers, config.dns_port, config.dns_timeout)
        self.budget = config.dns_timeout * BUDGET_FACTOR
        # Load the public suffix list now, not on the event loop during the first check.
        organizational_domain("example.com")

    async def check(
        self,
        raw: bytes,
        *,
        mail_from: str,
        peer_ip: str,
        helo: str,
        headers: HeaderSection | None = None,
    ) -> AuthVerdict:
        """The verdict on ``raw``. ``headers`` is the listener's reading of its header section
        (the one the reader's view is built from); without it, the message is read here."""
        try:
            verdict = await self._check(raw, mail_from, peer_ip, helo, headers)
        except Exception:
            log.exception("Checking the sender of a message from %s failed", mail_from or helo)
            return AuthVerdict.unverified()
        log.debug("Sender check for %s via %s: %s", mail_from, peer_ip, verdict)
        return verdict

    async def _check(
        self, raw: bytes, mail_from: str, peer_ip: str, helo: str, headers: HeaderSection | None
    ) -> AuthVerdict:
        if headers is None:
            section = read_header_section(raw)
            # A header section the listener would refuse has no author we could vouch for.
            headers = section if isinstance(section, HeaderSection) else HeaderSection((), 0)
        if self.config.trusted_authserv_id:
            trusted = find_trusted(
                headers.all("authentication-results"), self.config.trusted_authserv_id
            )
            if trusted is not None:
                return self._from_header(trusted, headers)
        address, domain = _author(headers)
        spf_fallback = SpfResult("temperror", identity(mail_from, helo)[1] or None)
        spf, dkim, discovery = await asyncio.gather(
            self._guard(
                "SPF",
                check_spf(self.resolver, ip=peer_ip, mail_from=mail_from, helo=helo),
                spf_fallback,
                self.budget,
            ),
            # No overall deadline here: check_dkim bounds its own lookups, and the hashing
            # after them depends on the message's size, not on DNS.
            self._guard(
                "DKIM",
                check_dkim(self.resolver, raw, dns_budget=self.budget),
                DkimResult("temperror"),
                None,
            ),
            self._guard("DMARC", self._discover(domain), Discovery(temperror=True), self.budget),
        )
        if domain is None:
            dmarc, policy = "permerror", None
        else:
            dmarc, policy = evaluate(domain, discovery, spf, dkim)
        return AuthVerdict(
            from_domain=domain,
            spf=spf.result,
            spf_domain=spf.domain,
            dkim=dkim.result,
            dkim_domains=list(dkim.domains),
            dmarc=dmarc,
            dmarc_policy=policy,
            source="checked",
            from_address=address,
        )

    async def _discover(self, domain: str | None) -> Discovery:
        return Discovery() if domain is None else await discover(self.resolver, domain)

    async def _guard(
        self, what: str, work: Awaitable[_T], fallback: _T, deadline: float | None
    ) -> _T:
        """``work``'s result, or ``fallback`` if it overruns ``deadline`` or goes wrong."""
        try:
            async with asyncio.timeout(deadline):
                return await work
        except TimeoutError:
            log.info("%s check gave up: no DNS answers within %.1f s", what, deadline or 0)
        except Exception:
            log.exception("%s check failed", what)
        return fallback

    def _from_header(self, trusted: AuthResults, headers: HeaderSection) -> AuthVerdict:
        spf, spf_domain = spf_of(trusted)
        dkim, dkim_domains = dkim_of(trusted)
        dmarc, policy, header_from = dmarc_of(trusted)
        address, domain = _author(headers)
        if dmarc != "none" and (domain is None or normal_domain(header_from or "") != domain):
            # The MTA's DMARC result is about the From *it* read; unless that is the From we
            # read (and show), its result says nothing about ours.
            log.info(
                "Trusted Authentication-Results: dmarc is about header.from=%s, the From is %s;"
                " not believed",
                header_from,
                domain,
            )
            dmarc, policy = "permerror", None
        return AuthVerdict(
            from_domain=domain,
            spf=spf,
            spf_domain=spf_domain,
            dkim=dkim,
            dkim_domains=dkim_domains,
            dmarc=dmarc,
            dmarc_policy=policy,
            source="trusted-header",
            from_address=address,
        )


def _author(headers: HeaderSection) -> tuple[str | None, str | None]:
    """(address, domain) of the message's one author; (None, None) when there is none."""
    try:
        return author(headers.all("from"))
    except AuthorError as e:
        log.info("No DMARC check possible: %s", e)
        return None, None
