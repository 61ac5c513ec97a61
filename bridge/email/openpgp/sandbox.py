"""`open_mail` in a worker process with a memory limit and a deadline: how the inbound pipeline
should call it.

Why a process and not just a thread: measured with rpgp-py 0.20 on this machine,
- the engine holds the GIL for the whole call, so a thread does not keep the event loop
  running (a 100 MB decryption stalled a 5 ms ticker thread for 0.5 s);
- it decompresses eagerly and without a cap: a 1.5 MB gpg message (zlib of zeros) decrypted
  to 1.2 GB in 11 s, 3.4 GB resident. Compressed content is only visible after decryption,
  so no check on the ciphertext can bound this.
In a child with RLIMIT_AS both become a clean `ResourceLimitError`, and the bridge's GIL is
free while it waits (call `Worker.open_mail` via `asyncio.to_thread`).

One long-lived child serves the calls one at a time (the engine is serial anyway), so a call
costs a pipe round trip, not a Python start-up (~0.16 s); it is restarted after it dies (a
failed allocation aborts it) or overruns its deadline (it is killed). The protocol is JSON
both ways, not pickle: the child parses hostile mail, and its answers must not be able to
run code in the bridge. The secret key travels over the pipe (same user, never on disk).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import resource
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from . import keys, pgpmime
from .keys import (
    MAX_CIPHERTEXT_BYTES,
    OpenPGPError,
    PublicKey,
    SecretKey,
    SignatureStatus,
    TooLargeError,
    Verification,
)
from .pgpmime import KeySource, MailKind, OpenedMail

log = logging.getLogger("bridge.email.openpgp.sandbox")

MEMORY_LIMIT_BYTES = 1024 * 1024 * 1024  # the child's address space: ~10x a 25 MiB mail
TIMEOUT_SECONDS = 30.0
_LENGTH = struct.Struct(">Q")

# Errors that cross the process boundary by name (their classes are all from this package).
_ERRORS: dict[str, type[OpenPGPError]] = {
    cls.__name__: cls
    for cls in (
        keys.OpenPGPError,
        keys.KeyFormatError,
        keys.DecryptionError,
        keys.TooLargeError,
        pgpmime.MailFormatError,
    )
}


class ResourceLimitError(TooLargeError):
    """The work went over its memory or time budget (a decompression bomb, typically)."""


class Worker:
    """A child process that opens mail. Thread-safe (calls are serialised); `close` ends it."""

    def __init__(
        self, *, memory_bytes: int = MEMORY_LIMIT_BYTES, timeout: float = TIMEOUT_SECONDS
    ) -> None:
        self.memory_bytes = memory_bytes
        self.timeout = timeout
        self._lock = threading.Lock()
        self._child: subprocess.Popen[bytes] | None = None

    def open_mail(
        self,
        raw: bytes,
        secret_key: bytes,
        *,
        peer_keys: Sequence[bytes] = (),
        max_bytes: int = MAX_CIPHERTEXT_BYTES,
    ) -> OpenedMail:
        """pgpmime.open_mail(raw, SecretKey.from_bytes(secret_key), peer_keys=...) in the
        child. Keys are the stored bytes. Blocking: run it in a thread. Raises what open_mail
        raises, and ResourceLimitError when the child runs out of memory or time."""
        if len(raw) > max_bytes:
            raise TooLargeError(f"mail of {len(raw)} bytes is above {max_bytes}")
        request = {
            "raw": _b64(raw),
            "key": _b64(secret_key),
            "peers": [_b64(k) for k in peer_keys],
            "max_bytes": max_bytes,
        }
        with self._lock:
            answer = self._exchange(json.dumps(request).encode())
        if "error" in answer:
            name, message, code = answer["error"]
            if name == "MemoryError":
                raise ResourceLimitError("decryption went over its memory limit")
            raise _ERRORS.get(name, OpenPGPError)(message, code)
        return _opened_from_json(answer["ok"])

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _exchange(self, payload: bytes) -> dict[str, Any]:
        child = self._start()
        assert child.stdin is not None and child.stdout is not None
        deadline = time.monotonic() + self.timeout
        try:
            child.stdin.write(_LENGTH.pack(len(payload)) + payload)
            child.stdin.flush()
            (length,) = _LENGTH.unpack(_read(child.stdout, _LENGTH.size, deadline))
            return json.loads(_read(child.stdout, length, deadline))
        except TimeoutError:
            log.warning("OpenPGP worker over its %g s deadline: killed", self.timeout)
            self._stop()
            raise ResourceLimitError("decryption took too long") from None
        except (EOFError, BrokenPipeError, OSError, ValueError):
            code = self._stop()
            # Rust aborts on a failed allocation: that is the memory limit at work.
            log.warning("OpenPGP worker died (exit code %s): over its limits", code)
            raise ResourceLimitError("decryption went over its memory limit") from None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._child is None or self._child.poll() is not None:
            self._child = subprocess.Popen(
                [sys.executable, "-m", __name__, str(self.memory_bytes)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                close_fds=True,
            )
        return self._child

    def _stop(self) -> int | None:
        child, self._child = self._child, None
        if child is None:
            return None
        if child.poll() is None:
            child.kill()  # our own child, by its handle
        for stream in (child.stdin, child.stdout):
            if stream is not None:
                stream.close()
        return child.wait()


def _read(stream: IO[bytes], size: int, deadline: float) -> bytes:
    """Exactly `size` bytes, or TimeoutError at the deadline, EOFError if the child is gone."""
    chunks: list[bytes] = []
    fd = stream.fileno()
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            raise TimeoutError
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _b64(data: bytes) -> str:
    return base64.b64encode(bytes(data)).decode("ascii")


def _opened_to_json(opened: OpenedMail) -> dict[str, Any]:
    v = opened.verification
    return {
        "kind": opened.kind.value,
        "content": _b64(opened.content),
        "verification": [v.status.value, v.signer_fingerprint, v.key_fingerprint],
        "key_source": opened.key_source.value if opened.key_source else None,
        "protected": opened.protected,
        "protected_headers": [list(pair) for pair in opened.protected_headers],
        "autocrypt": list(opened.autocrypt),
        "gossip": list(opened.gossip),
    }


def _opened_from_json(data: dict[str, Any]) -> OpenedMail:
    status, signer, key = data["verification"]
    return OpenedMail(
        kind=MailKind(data["kind"]),
        content=base64.b64decode(data["content"]),
        verification=Verification(SignatureStatus(status), signer, key),
        key_source=KeySource(data["key_source"]) if data["key_source"] else None,
        protected=bool(data["protected"]),
        protected_headers=tuple((str(n), str(v)) for n, v in data["protected_headers"]),
        autocrypt=tuple(str(v) for v in data["autocrypt"]),
        gossip=tuple(str(v) for v in data["gossip"]),
    )


# --- the child -------------------------------------------------------------------------------


def _serve(memory_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    # The frames get their own copy of stdout; anything else printed goes to stderr.
    source, sink = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    while True:
        header = source.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return  # the bridge closed the pipe
        request = json.loads(source.read(_LENGTH.unpack(header)[0]))
        answer = json.dumps(_handle(request)).encode()
        sink.write(_LENGTH.pack(len(answer)) + answer)
        sink.flush()


def _handle(request: dict[str, Any]) -> dict[str, Any]:
    try:
        key = SecretKey.from_bytes(base64.b64decode(request["key"]))
        peers = [PublicKey.from_bytes(base64.b64decode(k)) for k in request["peers"]]
        raw = base64.b64decode(request["raw"])
        opened = pgpmime.open_mail(raw, key, peer_keys=peers, max_bytes=request["max_bytes"])
        return {"ok": _opened_to_json(opened)}
    except OpenPGPError as error:
        return {"error": [type(error).__name__, str(error), error.code]}
    except MemoryError:
        return {"error": ["MemoryError", "", None]}


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
