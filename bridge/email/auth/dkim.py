"""DKIM (RFC 6376): which domains vouch for this message with a valid signature?

dkimpy does the cryptography, but it is synchronous and folds every DNS or key problem into a
plain "False". So the work is split in three: read the signatures (dkimpy, in a thread), fetch
their key records concurrently through our resolver, then verify with those records handed to
dkimpy (in a thread, as hashing a large body takes a while). That keeps the configured servers
and deadline, and lets a missing key (permerror), a DNS outage (temperror) and a broken
signature (fail) come out as different results.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import dkim

from .dns import DnsTempError, Resolver

log = logging.getLogger(__name__)
# dkimpy logs every key problem at ERROR; those are the sender's problems, not ours.
_dkimpy_log = logging.getLogger(f"{__name__}.dkimpy")
_dkimpy_log.setLevel(logging.CRITICAL)

# Legitimate mail carries one to three signatures; more is someone making us do work.
MAX_SIGNATURES = 8


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass | fail | none | temperror | permerror
    domains: list[str] = field(default_factory=list)  # d= of the signatures that verified


@dataclass
class _Signature:
    index: int
    domain: str = ""
    selector: str = ""
    result: str | None = None  # decided before verification (unreadable signature, DNS, key)
    key: bytes = b""

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


async def check_dkim(resolver: Resolver, raw: bytes, *, dns_budget: float) -> DkimResult:
    """Verify up to :data:`MAX_SIGNATURES` signatures; ``dns_budget`` bounds the key lookups."""
    if b"dkim-signature" not in _header_block(raw).lower():
        return DkimResult("none")  # the common unsigned case, without parsing the message
    signatures = await asyncio.to_thread(_read_signatures, raw)
    if not signatures:
        return DkimResult("none")
    try:
        async with asyncio.timeout(dns_budget):
            await _fetch_keys(resolver, signatures)
    except TimeoutError:
        for sig in signatures:
            if sig.result is None and not sig.key:
                sig.result = "temperror"
    await asyncio.to_thread(_verify, raw, signatures)
    return _combine(signatures)


def _header_block(raw: bytes) -> bytes:
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=-1)
    return raw if end < 0 else raw[:end]


def _read_signatures(raw: bytes) -> list[_Signature]:
    try:
        message = dkim.DKIM(raw, logger=_dkimpy_log)
    except dkim.DKIMException:
        return [_Signature(0, result="permerror")]  # headers dkimpy cannot even split
    count = sum(1 for name, _ in message.headers if name.lower() == b"dkim-signature")
    if count > MAX_SIGNATURES:
        log.info("Verifying only the first %d of %d DKIM signatures", MAX_SIGNATURES, count)
    signatures = []
    for index in range(min(count, MAX_SIGNATURES)):
        sig = _Signature(index)
        try:
            # Parses the tags and checks v=, a=, d=/i=, x=, t= and the rest of their syntax.
            fields = message.verify_headerprep(index)[0]
            sig.domain = fields[b"d"].decode("ascii").lower().rstrip(".")
            sig.selector = fields[b"s"].decode("ascii").lower()
        except (dkim.DKIMException, UnicodeDecodeError):
            sig.result = "permerror"
        signatures.append(sig)
    return signatures


async def _fetch_keys(resolver: Resolver, signatures: list[_Signature]) -> None:
    pending = [sig for sig in signatures if sig.result is None]
    names = sorted({sig.key_name for sig in pending})
    answers = await asyncio.gather(*(resolver.txt(n) for n in names), return_exceptions=True)
    by_name = dict(zip(names, answers, strict=True))
    for sig in pending:
        answer = by_name[sig.key_name]
        if isinstance(answer, DnsTempError):
            sig.result = "temperror"
        elif isinstance(answer, BaseException):
            raise answer
        elif not answer:
            sig.result = "permerror"  # no key at that selector
        else:
            sig.key = answer[0].encode("utf-8")


def _verify(raw: bytes, signatures: list[_Signature]) -> None:
    message = dkim.DKIM(raw, logger=_dkimpy_log)
    for sig in signatures:
        if sig.result is not None:
            continue
        try:
            dkim.evaluate_pk(sig.key_name.encode(), sig.key)
        except Exception:  # KeyFormatError, but also binascii/parse errors dkimpy lets through
            sig.result = "permerror"
            continue
        try:
            ok = message.verify(sig.index, dnsfunc=lambda _name, timeout=0, key=sig.key: key)
            sig.result = "pass" if ok else "fail"
        except dkim.ValidationError:
            sig.result = "fail"  # after verify_headerprep, this is a body hash mismatch
        except dkim.DKIMException:
            sig.result = "permerror"  # key too small, unknown canonicalisation, …
        except Exception:
            log.exception("DKIM verification of a %s signature failed unexpectedly", sig.domain)
            sig.result = "permerror"


def _combine(signatures: list[_Signature]) -> DkimResult:
    results = [sig.result for sig in signatures]
    passed = list(dict.fromkeys(sig.domain for sig in signatures if sig.result == "pass"))
    if passed:
        return DkimResult("pass", passed)
    # A signature that verifiably failed says more than one we could not check.
    for result in ("fail", "temperror", "permerror"):
        if result in results:
            return DkimResult(result)
    return DkimResult("none")
