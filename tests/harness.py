"""Test harness: the real bridge as a subprocess, and matrix-nio users that really decrypt."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    Event,
    InviteMemberEvent,
    LoginResponse,
    MegolmEvent,
    MessageDirection,
    RoomCreateResponse,
    RoomMemberEvent,
    RoomMessagesResponse,
    SyncResponse,
)
from nio.api import RoomPreset
from nio.exceptions import EncryptionError

from bridge.quickstart.synapse import LocalSynapse

ENCRYPTION_STATE = {
    "type": "m.room.encryption",
    "state_key": "",
    "content": {"algorithm": "m.megolm.v1.aes-sha2"},
}


@dataclass
class BridgeProcess:
    """`python -m bridge` against the test Synapse, as an admin would run it."""

    config_path: Path
    appservice_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        log = self.log_path.open("ab")
        log.write(f"\n==== bridge start {time.strftime('%X')} ====\n".encode())
        log.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLOAKROOM_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bridge", "-c", str(self.config_path)],
            cwd=self.config_path.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.process.returncode}:\n{self.tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"bridge not ready within {timeout} s:\n{self.tail()}")

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.appservice_port}/_matrix/mau/ready"
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError):
            return False

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class Env:
    """Everything a test needs to know about the running homeserver and bridge."""

    synapse: LocalSynapse
    bridge: BridgeProcess
    config: dict[str, Any]
    base_dir: Path
    bot_mxid: str
    smtp_port: int = 0
    max_recipients: int = 0
    metrics_port: int = 0  # the main bridge's /metrics and /health
    dns: Any = None  # tests.dnsserver.DnsServer: the bridge's DNS
    relay: Any = None  # tests.relay.TestRelay: where the bridge sends mail
    onboarding: Any = None  # BridgeProcess: a second bridge with the guard and welcome on
    onboarding_smtp_port: int = 0
    strict: Any = None  # BridgeProcess: a third bridge with encryption.share_with: cross-signed
    strict_smtp_port: int = 0
    clients: list[AsyncClient] = field(default_factory=list)
    # user ID → password of the users new_user registered (to log in again, or for UIA).
    passwords: dict[str, str] = field(default_factory=dict)

    @property
    def hs_token(self) -> str:
        return self.config["appservice"]["hs_token"]

    @property
    def appservice_url(self) -> str:
        return f"http://127.0.0.1:{self.bridge.appservice_port}"

    async def new_user(self, name: str | None = None) -> AsyncClient:
        """A fresh E2EE user: registered, logged in, device keys uploaded, first sync done."""
        localpart = name or f"user{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        await asyncio.to_thread(self.synapse.register_user, localpart, password)
        store = self.base_dir / "nio" / localpart
        store.mkdir(parents=True, exist_ok=True)
        client = AsyncClient(
            self.synapse.url,
            f"@{localpart}:{self.synapse.server_name}",
            store_path=str(store),
            config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
        )
        resp = await client.login(password, device_name="test")
        assert isinstance(resp, LoginResponse), resp
        if client.should_upload_keys:
            await client.keys_upload()
        await client.sync(timeout=0, full_state=True)
        self.clients.append(client)
        self.passwords[client.user_id] = password
        return client

    async def register(self, name: str | None = None) -> tuple[str, str]:
        """A user who exists but has never logged in: (user ID, password)."""
        localpart = name or f"user{secrets.token_hex(4)}"
        password = secrets.token_urlsafe(12)
        await asyncio.to_thread(self.synapse.register_user, localpart, password)
        user_id = f"@{localpart}:{self.synapse.server_name}"
        self.passwords[user_id] = password
        return user_id, password

    async def login(self, user_id: str, device_name: str = "test") -> AsyncClient:
        """A new device of an existing user (nio): logged in, keys uploaded, not synced yet."""
        localpart = user_id[1:].split(":")[0]
        store = self.base_dir / "nio" / f"{localpart}-{secrets.token_hex(3)}"
        store.mkdir(parents=True, exist_ok=True)
        client = AsyncClient(
            self.synapse.url,
            user_id,
            store_path=str(store),
            config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
        )
        resp = await client.login(self.passwords[user_id], device_name=device_name)
        assert isinstance(resp, LoginResponse), resp
        if client.should_upload_keys:
            await client.keys_upload()
        # No first sync here: invites waiting for this user are then seen by accept_invite.
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for client in self.clients:
            await client.close()
        self.clients.clear()


async def sync_until(
    client: AsyncClient,
    predicate: Callable[[str, Event], bool],
    timeout: float = 30,
) -> tuple[str, Event]:
    """Sync until an event in some room satisfies predicate; returns (room_id, event)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        resp = await client.sync(timeout=1000)
        assert isinstance(resp, SyncResponse), resp
        if client.should_upload_keys:
            await client.keys_upload()
        if client.should_query_keys:
            await client.keys_query()
        if client.should_claim_keys:
            await client.keys_claim(client.get_users_for_key_claiming())
        for room_id, room in resp.rooms.join.items():
            for event in room.timeline.events:
                if predicate(room_id, event):
                    return room_id, event
        for room_id, room in resp.rooms.invite.items():
            for event in room.invite_state:
                if predicate(room_id, event):
                    return room_id, event
    raise TimeoutError("no matching event within the timeout")


async def open_dm_with_bot(client: AsyncClient, bot: str, encrypted: bool = True,
                           preset: RoomPreset = RoomPreset.trusted_private_chat) -> str:
    """Create a DM, invite the bot, and wait until it has joined."""
    resp = await client.room_create(
        is_direct=True,
        invite=[bot],
        preset=preset,
        initial_state=[ENCRYPTION_STATE] if encrypted else [],
    )
    assert isinstance(resp, RoomCreateResponse), resp
    room_id = resp.room_id
    await sync_until(
        client,
        lambda rid, e: rid == room_id
        and isinstance(e, RoomMemberEvent)
        and e.state_key == bot
        and e.membership == "join",
    )
    return room_id


async def send_text(client: AsyncClient, room_id: str, body: str) -> str:
    resp = await client.room_send(
        room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": body},
        ignore_unverified_devices=True,
    )
    return resp.event_id


def from_sender(room_id: str, sender: str) -> Callable[[str, Event], bool]:
    """A message (decrypted or not) from sender in room_id."""

    def predicate(rid: str, event: Event) -> bool:
        return rid == room_id and event.sender == sender and hasattr(event, "body")

    return predicate


def undecryptable(event: Event) -> bool:
    return isinstance(event, MegolmEvent)


def is_invite(event: Event) -> bool:
    return isinstance(event, InviteMemberEvent)


def put_transaction(env: Env, txn_id: str, body: bytes | dict[str, Any],
                    token: str | None) -> int:
    """PUT a transaction to the bridge as the homeserver would; returns the HTTP status."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{env.appservice_url}/_matrix/app/v1/transactions/{txn_id}", data=data, method="PUT"
    )
    req.add_header("Content-Type", "application/json")
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


async def accept_invite(
    client: AsyncClient,
    predicate: Callable[[str], bool] | None = None,
    timeout: float = 60,
    inviter_prefix: str | None = None,
) -> str:
    """Wait for an invite (optionally to a room matching predicate, or from an inviter whose ID
    starts with inviter_prefix), join it, return the room."""
    room_id, _ = await sync_until(
        client,
        lambda rid, e: isinstance(e, InviteMemberEvent)
        and e.state_key == client.user_id
        and e.membership == "invite"
        and (predicate is None or predicate(rid))
        and (inviter_prefix is None or e.sender.startswith(inviter_prefix)),
        timeout=timeout,
    )
    await client.join(room_id)
    await sync_until(
        client,
        lambda rid, e: rid == room_id
        and isinstance(e, RoomMemberEvent)
        and e.state_key == client.user_id
        and e.membership == "join",
    )
    return room_id


async def room_history(client: AsyncClient, room_id: str, limit: int = 500) -> list[Event]:
    """The room's timeline, oldest first, with Megolm events decrypted where nio can."""
    await client.sync(timeout=0)
    resp = await client.room_messages(
        room_id, start=client.next_batch, direction=MessageDirection.back, limit=limit
    )
    assert isinstance(resp, RoomMessagesResponse), resp
    events = []
    for event in reversed(resp.chunk):
        if isinstance(event, MegolmEvent):
            try:
                decrypted = client.decrypt_event(event)
            except EncryptionError:
                decrypted = event  # no session for it on this device: stays a Megolm event
            event = decrypted if not isinstance(decrypted, MegolmEvent) else event
        events.append(event)
    return events


async def wait_for_event(
    client: AsyncClient, room_id: str, predicate: Callable[[Event], bool], timeout: float = 60
) -> Event:
    """Poll the room's history (not just new syncs) until an event matches."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in await room_history(client, room_id):
            if predicate(event):
                return event
        await asyncio.sleep(0.5)
    raise TimeoutError(f"no matching event in {room_id} within {timeout} s")
