"""The security checkup: one user's encryption setup seen from outside, and what to do about it.

Everything here is read-only. The bot looks at the user's public keys the way any of their
contacts' clients would (``/keys/query`` plus signature checks), and at whether a server-side key
backup exists (metadata only). It never creates devices, keys or backups for anyone and never
sees a secret.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from mautrix.api import Method, Path
from mautrix.appservice import IntentAPI
from mautrix.crypto.signature import verify_signature_json
from mautrix.errors import MatrixRequestError
from mautrix.types import UserID

# Remote users' keys come over federation; do not let a slow server hold the report up long.
KEYS_QUERY_TIMEOUT_MS = 10_000


class Identity(Enum):
    OK = "ok"  # a master key, and a self-signing key it signed
    MISSING = "missing"  # no master key at all
    BROKEN = "broken"  # a master key without a valid self-signing key


class Backup(Enum):
    PRESENT = "present"
    MISSING = "missing"
    UNKNOWN = "unknown"  # the bridge cannot act as this user, or the server would not say


@dataclass(frozen=True)
class Device:
    device_id: str
    name: str

    def label(self) -> str:
        return f"“{self.name}” ({self.device_id})" if self.name else self.device_id


@dataclass
class DeviceStatus:
    identity: Identity
    devices: list[Device] = field(default_factory=list)
    unsigned: list[Device] = field(default_factory=list)


@dataclass
class SecurityReport:
    user_id: str
    mailbox: str | None
    status: DeviceStatus
    backup: Backup
    backup_version: str | None = None

    @property
    def all_clear(self) -> bool:
        return (
            self.status.identity == Identity.OK
            and not self.status.unsigned
            and self.backup == Backup.PRESENT
        )


def _signed_by(obj: Any, user_id: str, key: str) -> bool:
    """Whether obj carries a valid signature of user_id's ed25519 key (whose id is the key)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("signatures"), dict):
        return False
    try:
        return verify_signature_json(obj, UserID(user_id), key, key)
    except (KeyError, ValueError, TypeError):
        return False


def _cross_signing_key(obj: Any, user_id: str, usage: str) -> str | None:
    """The ed25519 public key of a cross-signing key object, if it is one for this usage."""
    if not isinstance(obj, dict) or obj.get("user_id") != user_id:
        return None
    if usage not in (obj.get("usage") or []):
        return None
    keys = obj.get("keys")
    if not isinstance(keys, dict) or len(keys) != 1:
        return None
    key_id, key = next(iter(keys.items()))
    return key if key_id == f"ed25519:{key}" else None


def device_status(resp: dict[str, Any], user_id: str) -> DeviceStatus:
    """Master key → self-signing key → each device, verified as a client verifies them."""
    master = _cross_signing_key(resp.get("master_keys", {}).get(user_id), user_id, "master")
    ssk_obj = resp.get("self_signing_keys", {}).get(user_id)
    ssk = _cross_signing_key(ssk_obj, user_id, "self_signing")
    if master is None:
        # A self-signing key nobody vouches for proves nothing about the devices it signs.
        identity, ssk = Identity.MISSING, None
    elif ssk is None or not _signed_by(ssk_obj, user_id, master):
        identity, ssk = Identity.BROKEN, None
    else:
        identity = Identity.OK
    status = DeviceStatus(identity)
    devices = resp.get("device_keys", {}).get(user_id) or {}
    for device_id, keys in sorted(devices.items()):
        if not isinstance(keys, dict):
            continue
        unsigned = keys.get("unsigned")
        name = unsigned.get("device_display_name") if isinstance(unsigned, dict) else None
        device = Device(device_id, str(name or ""))
        status.devices.append(device)
        # The object must also say whose it is: a signed key moved to another id is not signed.
        genuine = keys.get("user_id") == user_id and keys.get("device_id") == device_id
        if not (ssk and genuine and _signed_by(keys, user_id, ssk)):
            status.unsigned.append(device)
    return status


class Checkup:
    """Gathers security reports. `act_as_users`: the registration has the non-exclusive
    namespace for local users (onboarding.guard is not off), so the bot may ask the homeserver
    about a local user's key backup as that user."""

    def __init__(
        self, bot: IntentAPI, *, domain: str, email_domain: str, act_as_users: bool
    ) -> None:
        self.bot = bot
        self.domain = domain
        self.email_domain = email_domain
        self.act_as_users = act_as_users
        self.log = logging.getLogger("bridge.onboarding.checkup")

    def is_local(self, user_id: str) -> bool:
        return user_id.startswith("@") and user_id.endswith(f":{self.domain}")

    def mailbox(self, user_id: str) -> str | None:
        if not self.is_local(user_id):
            return None
        return f"{user_id[1:].rpartition(':')[0]}@{self.email_domain}"

    async def devices(self, user_id: str) -> DeviceStatus:
        resp = await self.bot.api.request(
            Method.POST,
            Path.v3.keys.query,
            {"device_keys": {user_id: []}, "timeout": KEYS_QUERY_TIMEOUT_MS},
        )
        return device_status(resp, user_id)

    async def backup(self, user_id: str) -> tuple[Backup, str | None]:
        if not (self.act_as_users and self.is_local(user_id)):
            return Backup.UNKNOWN, None
        intent = self.bot.user(UserID(user_id))
        try:
            # Only the current version's metadata; the keys themselves are never fetched.
            resp = await intent.api.request(Method.GET, Path.v3.room_keys.version)
        except MatrixRequestError as e:
            if e.http_status == 404 and e.errcode == "M_NOT_FOUND":
                return Backup.MISSING, None
            self.log.warning("Could not look at the key backup of %s: %s", user_id, e)
            return Backup.UNKNOWN, None
        version = resp.get("version") if isinstance(resp, dict) else None
        return Backup.PRESENT, str(version) if version is not None else None

    async def report(self, user_id: str) -> SecurityReport:
        status = await self.devices(user_id)
        backup, version = await self.backup(user_id)
        return SecurityReport(user_id, self.mailbox(user_id), status, backup, version)
