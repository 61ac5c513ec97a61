"""The OpenSPF RFC 7208 test suite, fetched from PyPI and served by a real DNS server.

The suite (openspf.org, release 2014.04) ships in pyspf's sdist as ``test/rfc7208-tests.yml``.
It is not committed here: :func:`suite_file` downloads the sdist with pip (CI can reach package
registries only), checks its hash and keeps the YAML in the git-ignored ``.cache/``.

Each YAML document is a scenario: ``zonedata`` (names → records) and ``tests``.
:class:`SuiteDnsServer` answers a scenario's zone over UDP and TCP on loopback with the
conventions of the suite's own driver (pyspf's ``test/testspf.py``):

- An ``SPF`` record (type 99) is also published as TXT, unless the name has a ``TXT`` entry;
  ``TXT: NONE`` only suppresses that copy.
- A bare ``TIMEOUT`` entry makes questions for types *not listed before it* go unanswered, so
  the client meets its real deadline; a record whose value is ``TIMEOUT`` does so for its type.
- A ``CNAME`` is answered together with its target's records, one level deep.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dnslib import AAAA, CNAME, MX, PTR, QTYPE, RCODE, RR, TXT, A, DNSRecord
from ruamel.yaml import YAML

from .dnsserver import DnsServer

PYSPF_VERSION = "2.0.14"
# The sdist's SHA-256 as published on PyPI: the suite is test data we did not write.
PYSPF_SHA256 = "57a7ef01bda090173aafb6af0106251686ed73f03db4e911fcd34c57fc347186"
SUITE_MEMBER = f"pyspf-{PYSPF_VERSION}/test/rfc7208-tests.yml"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "spf-suite"

_TTL = 60


class SuiteUnavailable(Exception):
    """The suite could not be downloaded (no route to PyPI): the test skips with this reason."""


def suite_file(cache: Path = CACHE) -> Path:
    """The path of ``rfc7208-tests.yml``, downloading pyspf's sdist the first time."""
    target = cache / f"rfc7208-tests-{PYSPF_VERSION}.yml"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"pyspf-{PYSPF_VERSION}.tar.gz"
    if not sdist.exists():
        _download(cache)
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != PYSPF_SHA256:
        # Not a skip: a different file under the same name must not pass silently.
        raise RuntimeError(f"{sdist} has SHA-256 {digest}, expected {PYSPF_SHA256}")
    with tarfile.open(sdist) as archive:
        member = archive.extractfile(SUITE_MEMBER)
        if member is None:
            raise RuntimeError(f"{SUITE_MEMBER} is not a file in {sdist}")
        partial = target.with_suffix(".part")
        partial.write_bytes(member.read())
        partial.replace(target)  # atomic, so an interrupted run leaves no half file
    return target


def _download(cache: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
        "--no-binary", ":all:", f"pyspf=={PYSPF_VERSION}", "-d", str(cache),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SuiteUnavailable(f"pip download pyspf=={PYSPF_VERSION} failed: {e}") from e
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SuiteUnavailable(f"pip download pyspf=={PYSPF_VERSION} failed: {last}")


@dataclass(frozen=True)
class Case:
    id: str
    scenario: str
    host: str
    mailfrom: str
    helo: str
    results: tuple[str, ...]  # acceptable results, the preferred one first
    explanation: str | None


@dataclass
class Scenario:
    description: str
    zone: dict[str, list[Any]]  # lower-case name → entries as the driver sees them
    cases: list[Case] = field(default_factory=list)


def load(path: Path) -> list[Scenario]:
    scenarios = []
    with path.open("rb") as stream:
        for doc in YAML(typ="safe").load_all(stream):
            scenario = Scenario(doc["description"], _zone(doc.get("zonedata") or {}))
            for case_id, data in doc["tests"].items():
                result = data["result"]
                scenario.cases.append(
                    Case(
                        id=case_id,
                        scenario=doc["description"],
                        host=str(data["host"]),
                        mailfrom=str(data["mailfrom"]),
                        helo=str(data["helo"]),
                        results=tuple(result) if isinstance(result, list) else (result,),
                        explanation=data.get("explanation"),
                    )
                )
            scenarios.append(scenario)
    return scenarios


def _zone(zonedata: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The driver's ``getrdata``: entries in order, then SPF copied to TXT if no TXT is given."""
    zone: dict[str, list[Any]] = {}
    for name, entries in zonedata.items():
        out: list[Any] = []
        copies: list[tuple[str, Any]] = []
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if not isinstance(entry, dict):
                out.append(entry)  # "TIMEOUT"
                continue
            ((rtype, value),) = entry.items()
            if rtype == "SPF" and not has_txt:
                copies.append(("TXT", value))
            if value != "NONE":
                out.append((rtype, value))
        zone[name.lower().rstrip(".")] = out + copies
    return zone


def _rdata(rtype: str, value: Any) -> Any:
    if rtype in ("TXT", "SPF"):
        strings = [value] if isinstance(value, str) else list(value)
        # A TXT RR holds at least one character-string (RFC 1035): the suite's empty list is
        # published as one empty string, the nearest thing a real zone can hold.
        return TXT([s.encode() for s in strings] or [b""])
    if rtype == "MX":
        preference, exchange = value
        return MX(str(exchange), preference=int(preference))
    return {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME}[rtype](str(value))


class SuiteDnsServer(DnsServer):
    """A :class:`DnsServer` answering from one scenario's zone with the suite's conventions."""

    def __init__(self, zone: dict[str, list[Any]]) -> None:
        super().__init__()
        self.zone = zone

    def _lookup(self, name: str, qtype: str, follow: bool = True) -> list[RR] | None:
        """The answer RRs for ``name``/``qtype``, or None to stay silent (a timeout)."""
        answers: list[RR] = []
        seen_qtype = False
        for entry in self.zone.get(name, []):
            if entry == "TIMEOUT":
                if not seen_qtype:
                    return None
                break
            rtype, value = entry
            if rtype == qtype:
                seen_qtype = True
                if value == "TIMEOUT":
                    return None
            if rtype == qtype or (rtype == "CNAME" and qtype != "CNAME"):
                rdata = _rdata(rtype, value)
                answers.append(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=_TTL))
            if rtype == "CNAME" and qtype != "CNAME" and follow:
                more = self._lookup(str(value).lower().rstrip("."), qtype, follow=False)
                if more is None:
                    return None
                answers += more
        return answers

    def _exists(self, name: str) -> bool:
        return any(key == name or key.endswith("." + name) for key in self.zone)

    def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        # From the raw labels: str() would escape characters such as spaces (\032).
        name = b".".join(request.q.qname.label).decode("utf-8", "replace").lower()
        qtype = QTYPE.get(request.q.qtype)
        with self._lock:
            self.queries.append((name, qtype))
        answers = self._lookup(name, qtype)
        if answers is None:
            return None
        reply = request.reply(ra=0, aa=1)
        for rr in answers:
            reply.add_answer(rr)
        if not answers and not self._exists(name):
            reply.header.rcode = RCODE.NXDOMAIN
        packed = reply.pack()
        if udp and len(packed) > self._udp_size(request):
            truncated = request.reply(ra=0, aa=1)
            truncated.header.tc = 1
            packed = truncated.pack()
        return packed
