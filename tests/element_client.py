"""Element's own crypto stack as a test client: matrix-js-sdk with Rust crypto, in Node.

Each `ElementClient` is one device: a `node tests/element/client.mjs` process that logs in with a
password (a new device every time), runs `initRustCrypto` and syncs as Element Web does. The
tests drive it over line-delimited JSON on the process's stdin/stdout.

    async with element_devices(env) as element:
        a = await element.login(user_id, env.passwords[user_id], "A")
        room_id = await a.accept_invite()
        (msg,) = await a.wait_for_messages(room_id, count=1)
        assert msg.decrypted and msg.shield_colour != "RED"
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ELEMENT_DIR = Path(__file__).parent / "element"
CLIENT_SCRIPT = ELEMENT_DIR / "client.mjs"
LOCKFILE = ELEMENT_DIR / "package-lock.json"
# The same stamp the Makefile writes after `npm ci`: newer than the lockfile means installed.
STAMP = ELEMENT_DIR / "node_modules" / ".installed"
# A room's history and an attachment come back as one JSON line; allow large ones.
LINE_LIMIT = 256 * 1024 * 1024


class ElementError(RuntimeError):
    """A command failed in the Node client (a Matrix error keeps its errcode and HTTP status)."""

    def __init__(self, message: str, errcode: str | None = None, status: int | None = None,
                 data: Any = None) -> None:
        super().__init__(f"{message} ({errcode})" if errcode else message)
        self.errcode = errcode
        self.status = status
        self.data = data


def node_unavailable() -> str | None:
    """Why the Element client cannot run here, or None when it can (installing the Node packages
    from the lockfile first, as `make test` does, when they are missing or out of date)."""
    if shutil.which("node") is None:
        return "node is not installed: the Element-stack (matrix-js-sdk) tests need Node 20+"
    if STAMP.exists() and STAMP.stat().st_mtime >= LOCKFILE.stat().st_mtime:
        return None
    if shutil.which("npm") is None:
        return "npm is not installed: cannot install tests/element's packages"
    result = subprocess.run(["npm", "ci", "--prefix", str(ELEMENT_DIR), "--no-audit", "--no-fund"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return f"npm ci failed for tests/element:\n{result.stderr[-2000:]}"
    STAMP.touch()
    return None


@dataclass
class ElementEvent:
    """One timeline event as Element sees it: decrypted content, or why it could not decrypt,
    and the shield Element draws for the sending device."""

    event_id: str
    sender: str
    type: str  # the decrypted type (a failure: m.room.message with msgtype m.bad.encrypted)
    wire_type: str
    state_key: str | None
    ts: int
    encrypted: bool
    decrypted: bool
    decryption_failure: str | None  # e.g. MEGOLM_UNKNOWN_INBOUND_SESSION_ID
    content: dict[str, Any]
    shield_colour: str | None  # NONE, GREY or RED (getEncryptionInfoForEvent); None: not decrypted
    shield_reason: str | None  # e.g. UNSIGNED_DEVICE, UNVERIFIED_IDENTITY; None with NONE

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ElementEvent:
        shield = data.pop("shield") or {}
        return cls(**data, shield_colour=shield.get("colour"), shield_reason=shield.get("reason"))

    @property
    def body(self) -> str:
        return self.content.get("body", "")

    @property
    def msgtype(self) -> str | None:
        return self.content.get("msgtype")

    @property
    def relates_to(self) -> dict[str, Any]:
        return self.content.get("m.relates_to") or {}

    @property
    def thread_root(self) -> str | None:
        relates = self.relates_to
        return relates.get("event_id") if relates.get("rel_type") == "m.thread" else None

    @property
    def reply_to(self) -> str | None:
        return (self.relates_to.get("m.in_reply_to") or {}).get("event_id")

    def summary(self) -> str:
        what = self.decryption_failure or self.msgtype or self.type
        return f"{self.event_id} {self.type} from {self.sender}: {what} {self.body[:60]!r}"


def is_message(event: ElementEvent) -> bool:
    """A decrypted (or plaintext) m.room.message. (An event that failed to decrypt also has type
    m.room.message in matrix-js-sdk, with msgtype m.bad.encrypted: hence the second check.)"""
    return event.type == "m.room.message" and event.decryption_failure is None


def is_invite_from(prefix: str) -> Callable[[dict[str, Any]], bool]:
    return lambda invite: (invite["inviter"] or "").startswith(prefix)


@dataclass
class ElementClient:
    """One Element device (one Node process)."""

    log_dir: Path | None = None
    user_id: str = ""
    device_id: str = ""
    password: str = ""
    homeserver_url: str = ""
    log_path: Path | None = None
    _process: asyncio.subprocess.Process | None = None
    _reader: asyncio.Task[None] | None = None
    _pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def start(self, homeserver_url: str, user_id: str, password: str,
                    device_name: str = "Element test") -> ElementClient:
        """Password login (a new device), Rust crypto on, first sync done."""
        log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="element-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{user_id[1:].split(':')[0]}-{device_name}-{time.time_ns()}.log"
        with self.log_path.open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                # The WASM crypto needs little heap; keep several devices cheap on a small machine.
                "node", "--max-old-space-size=256", str(CLIENT_SCRIPT),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                cwd=ELEMENT_DIR, limit=LINE_LIMIT, env={**os.environ, "NODE_NO_WARNINGS": "1"},
            )
        self._reader = asyncio.create_task(self._read())
        result = await self._call("start", homeserver=homeserver_url, user_id=user_id,
                                  password=password, device_name=device_name, timeout=120)
        self.user_id, self.device_id = result["user_id"], result["device_id"]
        self.password, self.homeserver_url = password, homeserver_url
        return self

    async def _read(self) -> None:
        assert self._process and self._process.stdout
        try:
            while line := await self._process.stdout.readline():
                msg = json.loads(line)
                future = self._pending.pop(msg["id"], None)
                if future is None or future.done():
                    continue
                if "error" in msg:
                    err = msg["error"]
                    future.set_exception(ElementError(err["message"], err.get("errcode"),
                                                      err.get("status"), err.get("data")))
                else:
                    future.set_result(msg["result"])
        finally:
            # The process is gone: nothing pending will ever be answered.
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(
                        ElementError(f"the Node client exited:\n{self.log_tail()}"))
            self._pending.clear()

    async def _call(self, cmd: str, timeout: float = 60, **args: Any) -> Any:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            raise ElementError("the Node client is not running")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        line = json.dumps({"id": request_id, "cmd": cmd, "args": args})
        process.stdin.write(line.encode() + b"\n")
        await process.stdin.drain()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimeoutError(f"{cmd} took over {timeout} s:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # Rooms and invites

    async def rooms(self) -> list[dict[str, Any]]:
        """Every room the client knows: room_id, membership, name, encrypted, inviter, members."""
        return await self._call("rooms")

    async def invites(self) -> list[dict[str, Any]]:
        return [r for r in await self.rooms() if r["membership"] == "invite"]

    async def wait_for_invite(self, predicate: Callable[[dict[str, Any]], bool] | None = None,
                              timeout: float = 60, exclude: set[str] | None = None) -> str:
        """The room ID of a pending invite (matching predicate, not in exclude), when it syncs."""
        deadline = time.monotonic() + timeout
        while True:
            for invite in await self.invites():
                if (exclude is None or invite["room_id"] not in exclude) and (
                        predicate is None or predicate(invite)):
                    return invite["room_id"]
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.user_id}/{self.device_id}: no invite within {timeout} s")
            await asyncio.sleep(0.2)

    async def join(self, room_id: str, timeout: float = 60) -> None:
        """Join (retrying on 429 after retry_after_ms) and wait until the join has synced."""
        await self._call("join", room_id=room_id, timeout_ms=int(timeout * 1000),
                         timeout=timeout + 10)

    async def accept_invite(self, predicate: Callable[[dict[str, Any]], bool] | None = None,
                            timeout: float = 60) -> str:
        room_id = await self.wait_for_invite(predicate, timeout)
        await self.join(room_id, timeout)
        return room_id

    # Timeline

    async def messages(self, room_id: str) -> list[ElementEvent]:
        """The room's whole timeline as this device sees it now, oldest first (scrolled back to
        the room's creation; thread replies included, see ElementEvent.thread_root)."""
        return [ElementEvent.from_json(e) for e in await self._call("messages", room_id=room_id,
                                                                     timeout=120)]

    async def wait_for_messages(self, room_id: str,
                                predicate: Callable[[ElementEvent], bool] = is_message,
                                count: int = 1, timeout: float = 60) -> list[ElementEvent]:
        """Wait until at least `count` events match (by default: decrypted messages) and return
        the matching ones, oldest first. A failed decryption is not final: the Rust crypto retries
        when the key arrives, so this keeps looking until the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                events = await self.messages(room_id)
            except ElementError as e:
                # A device that logged in just now may not have synced the room yet.
                if "unknown room" not in str(e) or time.monotonic() > deadline:
                    raise
                events = []
            found = [e for e in events if predicate(e)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = "\n".join(e.summary() for e in events if e.state_key is None)
                raise TimeoutError(f"{self.user_id}/{self.device_id}: {len(found)} of {count} "
                                   f"events within {timeout} s in {room_id}; the timeline:\n{seen}")
            await asyncio.sleep(0.3)

    async def send(self, room_id: str, content: dict[str, Any],
                   event_type: str = "m.room.message") -> str:
        """Send an event (encrypted by the Rust crypto in an encrypted room); its event ID."""
        return (await self._call("send", room_id=room_id, type=event_type, content=content))[
            "event_id"]

    async def send_text(self, room_id: str, body: str, thread_root: str | None = None,
                        reply_to: str | None = None, html: str | None = None) -> str:
        """A text message as Element composes it: a thread reply carries the fallback reply."""
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if html is not None:
            content.update(format="org.matrix.custom.html", formatted_body=html)
        if thread_root:
            content["m.relates_to"] = {
                "rel_type": "m.thread", "event_id": thread_root,
                # Element marks the in-reply-to as a fallback unless the user replied explicitly.
                "is_falling_back": reply_to is None,
                "m.in_reply_to": {"event_id": reply_to or thread_root},
            }
        elif reply_to:
            content["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return await self.send(room_id, content)

    async def download_decrypted(self, file: dict[str, Any]) -> bytes:
        """An encrypted attachment's plaintext, from the event content's `file` (EncryptedFile):
        downloaded with authenticated media, hash checked and decrypted in the Node client."""
        result = await self._call("download", file=file, timeout=120)
        return base64.b64decode(result["data_b64"])

    async def download_raw(self, file: dict[str, Any]) -> bytes:
        """The ciphertext as the homeserver stores it (to decrypt with nio's decrypt_attachment)."""
        result = await self._call("download", file=file, timeout=120)
        return base64.b64decode(result["cipher_b64"])

    # Cross-signing

    async def bootstrap_cross_signing(self, password: str | None = None,
                                      recovery: bool = False) -> dict[str, Any]:
        """Create and publish this user's cross-signing keys (password UIA) and sign this device.
        With recovery=True also set up secret storage and a key backup, as Element's "set up
        recovery" does, and return the key as `recovery_key` (for `recover` on another device).
        On a user who already has cross-signing keys and no recovery, this resets them, as
        Element's "reset" does."""
        return await self._call("bootstrap_cross_signing", password=password or self.password,
                                recovery=recovery, timeout=120)

    async def recover(self, recovery_key: str) -> dict[str, Any]:
        """Element's "verify with recovery key": fetch the cross-signing keys from secret storage,
        cross-sign this device, switch the key backup on and restore it (older mail becomes
        readable). Returns status() plus backup_version, imported, total."""
        return await self._call("recover", recovery_key=recovery_key, timeout=120)

    async def restore_key_backup(self) -> dict[str, Any]:
        """Restore the key backup again (after recover): {backup_version, imported, total}. Other
        devices upload to the backup 0-10 s after they get a key (matrix-js-sdk spreads the load),
        so a test waiting for an old message polls this with a deadline."""
        return await self._call("restore_key_backup", timeout=120)

    async def status(self) -> dict[str, Any]:
        """This device's cross-signing state: cross_signing_ready, device_signed_by_owner, …"""
        return await self._call("status")

    async def device_status(self, user_id: str, device_id: str) -> dict[str, Any] | None:
        """How this device sees another one: signed_by_owner, cross_signing_verified, verified."""
        return await self._call("device_status", user_id=user_id, device_id=device_id)

    # Lifecycle

    async def restart(self) -> None:
        """Stop syncing and start again with the same device and crypto store (a page reload)."""
        await self._call("restart", timeout=120)

    async def stop(self) -> None:
        if self._process is None:
            return
        if self._process.returncode is None:
            with contextlib.suppress(ElementError, TimeoutError, ConnectionError):
                await self._call("stop", timeout=10)
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        if self._reader:
            await self._reader
        self._process = None


@dataclass
class ElementDevices:
    """Starts Element devices against one homeserver and stops them all at the end."""

    homeserver_url: str
    log_dir: Path | None = None
    clients: list[ElementClient] = field(default_factory=list)

    async def login(self, user_id: str, password: str,
                    device_name: str | None = None) -> ElementClient:
        """A new device of user_id (each call logs in again: two calls give devices A and B)."""
        client = ElementClient(self.log_dir)
        self.clients.append(client)
        await client.start(self.homeserver_url, user_id, password,
                           device_name or f"Element {len(self.clients)}")
        return client

    async def close(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.clients), return_exceptions=True)
        self.clients.clear()


@contextlib.asynccontextmanager
async def element_devices(env: Any) -> AsyncIterator[ElementDevices]:
    """For a test on tests.harness.Env: Element devices whose logs go to the run's directory."""
    devices = ElementDevices(env.synapse.url, env.base_dir / "element")
    try:
        yield devices
    finally:
        await devices.close()
