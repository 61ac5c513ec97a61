"""A tiny authoritative DNS server for tests: real DNS over loopback, records set per test.

It answers over UDP and TCP on one free port of 127.0.0.1 from the records a test gives it
(TXT, A, AAAA, MX), with NXDOMAIN for names that do not exist and an empty NOERROR answer for
names that exist with other types only (including "empty non-terminals" such as
_domainkey.example.test). UDP replies too big for the client are truncated, so the client
retries over TCP, as against a real server. A test can make a name SERVFAIL, or make the whole
server go silent to simulate an unreachable one. Every question asked is recorded in
:attr:`DnsServer.queries`, so tests can prove lookups really came here.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections import defaultdict
from typing import Any

from dnslib import AAAA, MX, QTYPE, RCODE, RR, TXT, A, DNSRecord

_TTL = 60
_UDP_DEFAULT_SIZE = 512  # without EDNS (RFC 1035)


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, dns: DnsServer) -> None:
        super().__init__(("127.0.0.1", port), _UdpHandler)
        self.dns = dns


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, dns: DnsServer) -> None:
        super().__init__(("127.0.0.1", port), _TcpHandler)
        self.dns = dns


class _UdpHandler(socketserver.BaseRequestHandler):
    server: _UdpServer

    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns.answer(data, udp=True)
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.StreamRequestHandler):
    server: _TcpServer

    def handle(self) -> None:
        while True:
            head = self.rfile.read(2)
            if len(head) < 2:
                return
            data = self.rfile.read(struct.unpack("!H", head)[0])
            reply = self.server.dns.answer(data, udp=False)
            if reply is None:
                # Silent: hold the connection open without a word, as a stuck server would.
                self.server.dns.stopped.wait()
                return
            self.wfile.write(struct.pack("!H", len(reply)) + reply)


def _chunks(text: str) -> list[bytes]:
    """A TXT record's character-strings: at most 255 bytes each (RFC 1035 §3.3.14)."""
    data = text.encode()
    return [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]


class DnsServer:
    """Use as a context manager; :attr:`port` is valid inside it."""

    def __init__(self) -> None:
        self.port = 0
        self.silent = False
        self.queries: list[tuple[str, str]] = []
        self.stopped = threading.Event()
        self._records: dict[str, list[RR]] = defaultdict(list)
        self._servfail: set[str] = set()
        self._lock = threading.Lock()
        self._servers: list[socketserver.BaseServer] = []

    # Records. Names are given without the trailing dot.

    def _add(self, name: str, rtype: str, rdata: Any) -> None:
        with self._lock:
            self._records[name.lower()].append(
                RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=_TTL)
            )

    def txt(self, name: str, *texts: str) -> None:
        for text in texts:
            self._add(name, "TXT", TXT(_chunks(text)))

    def a(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self._add(name, "A", A(address))

    def aaaa(self, name: str, *addresses: str) -> None:
        for address in addresses:
            self._add(name, "AAAA", AAAA(address))

    def mx(self, name: str, *exchanges: str) -> None:
        """MX records, the first given most preferred."""
        for i, exchange in enumerate(exchanges):
            self._add(name, "MX", MX(exchange, preference=10 * (i + 1)))

    def servfail(self, name: str) -> None:
        with self._lock:
            self._servfail.add(name.lower())

    def asked(self, name: str, qtype: str | None = None) -> bool:
        with self._lock:
            return any(n == name.lower() and qtype in (None, t) for n, t in self.queries)

    # Answering.

    def _exists(self, name: str) -> bool:
        return any(key == name or key.endswith("." + name) for key in self._records)

    def answer(self, data: bytes, *, udp: bool) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((name, qtype))
            if self.silent:
                return None
            reply = request.reply(ra=0, aa=1)
            if name in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
            else:
                for rr in self._records.get(name, []):
                    if rr.rtype == request.q.qtype:
                        reply.add_answer(rr)
                if not reply.rr and not self._exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
        packed = reply.pack()
        if udp and len(packed) > self._udp_size(request):
            truncated = request.reply(ra=0, aa=1)
            truncated.header.tc = 1
            packed = truncated.pack()
        return packed

    @staticmethod
    def _udp_size(request: DNSRecord) -> int:
        for rr in request.ar:
            if rr.rtype == QTYPE.OPT:
                return max(int(rr.rclass), _UDP_DEFAULT_SIZE)  # EDNS: the client's buffer
        return _UDP_DEFAULT_SIZE

    # Lifecycle.

    def __enter__(self) -> DnsServer:
        for _ in range(20):
            udp = _UdpServer(0, self)
            port = udp.server_address[1]
            try:
                tcp = _TcpServer(port, self)
            except OSError:  # that port is taken for TCP: try another
                udp.server_close()
                continue
            self.port, self._servers = port, [udp, tcp]
            for server in self._servers:
                threading.Thread(
                    target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
                ).start()
            return self
        raise RuntimeError("no free port for both UDP and TCP")

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()


def free_udp_port() -> int:
    """A port with nothing listening on it (for "server unreachable" tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
