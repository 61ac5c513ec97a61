"""A small asynchronous DNS client for sender authentication.

SPF, DKIM and DMARC need four record types and one distinction that matters: "this name has no
such record" (NXDOMAIN, or an empty answer) is an answer, and yields an empty list; "nobody told
us" (a timeout, SERVFAIL, REFUSED, no usable server) is not, and raises :class:`DnsTempError`, so
the caller can say *temperror* rather than wrongly concluding that a domain publishes nothing.
"""

from __future__ import annotations

import asyncio
import logging

import dns.asyncresolver
import dns.exception
import dns.inet
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

log = logging.getLogger(__name__)


class DnsTempError(Exception):
    """No answer could be had for a question (timeout, SERVFAIL, no reachable server)."""


class Resolver:
    """Asks the configured servers (or the system's, when none are given) with a short deadline.

    Every question gets at most ``timeout`` seconds in all, across retries and servers: the
    caller's own deadline is a small multiple of it, and mail waits on the answer.
    """

    def __init__(self, servers: list[str], port: int = 53, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._resolver = self._make(servers, port)
        # Half the budget per attempt, so a lost UDP packet still leaves room for one retry.
        self._resolver.timeout = timeout / 2
        self._resolver.lifetime = timeout
        # A cache would make a test server's later records invisible and buys little at a
        # bridge's mail volume; the upstream resolver caches anyway.
        self._resolver.cache = None

    @staticmethod
    def _make(servers: list[str], port: int) -> dns.asyncresolver.Resolver:
        if servers:
            for server in servers:
                if not dns.inet.is_address(server):
                    raise ValueError(f"DNS server {server!r} is not an IP address")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(s, port) for s in servers]
            return resolver
        try:
            return dns.asyncresolver.Resolver()
        except dns.resolver.NoResolverConfiguration:
            # No /etc/resolv.conf (a bare container, the offline quickstart): every question
            # then fails as a temporary error, and mail is delivered marked unverified.
            log.warning("No system DNS resolver is configured; sender checks will not resolve")
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = []
            return resolver

    async def _ask(self, name: str, rdtype: dns.rdatatype.RdataType) -> list:
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError):
            return []  # not a valid DNS name, so certainly no records there
        question = f"{name}/{rdtype.name}"
        try:
            # dnspython may sleep a retry back-off past its lifetime; this is the hard limit.
            async with asyncio.timeout(self.timeout):
                answer = await self._resolver.resolve(
                    qname, rdtype, raise_on_no_answer=False, search=False
                )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoResolverConfiguration as e:
            raise DnsTempError(f"{question}: no DNS servers") from e
        except (TimeoutError, dns.exception.Timeout) as e:
            raise DnsTempError(f"{question}: no answer within {self.timeout} s") from e
        except dns.exception.DNSException as e:
            # NoNameservers (SERVFAIL/REFUSED everywhere), YXDOMAIN, malformed replies, …
            raise DnsTempError(f"{question}: {e}") from e
        except OSError as e:  # e.g. no route to the server
            raise DnsTempError(f"{question}: {e}") from e
        return list(answer.rrset or [])

    async def txt(self, name: str) -> list[str]:
        """The TXT records at ``name``, each one's character-strings joined (RFC 7208 §3.3)."""
        rdatas = await self._ask(name, dns.rdatatype.TXT)
        return [b"".join(r.strings).decode("utf-8", "replace") for r in rdatas]

    async def a(self, name: str) -> list[str]:
        return [r.address for r in await self._ask(name, dns.rdatatype.A)]

    async def aaaa(self, name: str) -> list[str]:
        return [r.address for r in await self._ask(name, dns.rdatatype.AAAA)]

    async def addresses(self, name: str, version: int) -> list[str]:
        """A records for IPv4 (``version`` 4), AAAA records for IPv6."""
        return await (self.a(name) if version == 4 else self.aaaa(name))

    async def mx(self, name: str) -> list[str]:
        """The MX exchanges of ``name``, most preferred first, without the trailing dot."""
        rdatas = await self._ask(name, dns.rdatatype.MX)
        ordered = sorted(rdatas, key=lambda r: r.preference)
        return [r.exchange.to_text(omit_final_dot=True) for r in ordered]
