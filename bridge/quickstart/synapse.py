"""A local Synapse on loopback, for the quickstart and the integration tests.

Plain subprocess and urllib on purpose: pytest fixtures and the quickstart use it without an
event loop, and it must not import anything of Synapse's into our process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ruamel.yaml import YAML

# Every rate limit Synapse has, raised: tests register users and send in bursts.
_RELAXED = {"per_second": 10000, "burst_count": 100000}
RELAXED_RATE_LIMITS: dict[str, Any] = {
    "rc_message": _RELAXED,
    "rc_registration": _RELAXED,
    "rc_registration_token_validity": _RELAXED,
    "rc_login": {"address": _RELAXED, "account": _RELAXED, "failed_attempts": _RELAXED},
    "rc_joins": {"local": _RELAXED, "remote": _RELAXED},
    "rc_joins_per_room": _RELAXED,
    "rc_invites": {"per_room": _RELAXED, "per_user": _RELAXED, "per_issuer": _RELAXED},
    "rc_key_requests": _RELAXED,
    "rc_room_creation": _RELAXED,
    "rc_media_create": _RELAXED,
    "rc_profile": _RELAXED,
    "rc_presence": {"per_user": _RELAXED},
    "rc_delayed_event_mgmt": _RELAXED,
    "rc_user_directory": _RELAXED,
    "rc_reports": _RELAXED,
    "rc_3pid_validation": _RELAXED,
    "rc_admin_redaction": _RELAXED,
}


class SynapseError(RuntimeError):
    pass


@dataclass
class LocalSynapse:
    base_dir: Path
    port: int
    server_name: str = "localhost"
    registration_files: list[Path] = field(default_factory=list)
    relaxed_rate_limits: bool = False
    extra_config: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "homeserver.yaml"

    @property
    def overrides_path(self) -> Path:
        return self.base_dir / "overrides.yaml"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "synapse.out.log"

    def prepare(self) -> None:
        """Generate the config once (keys, secrets), then (re)write our overrides."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        data = self.base_dir / "data"
        data.mkdir(exist_ok=True)
        if not self.config_path.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "synapse.app.homeserver",
                    "--server-name",
                    self.server_name,
                    "--config-path",
                    str(self.config_path),
                    "--generate-config",
                    "--report-stats=no",
                    "--data-directory",
                    str(data),
                ],
                cwd=self.base_dir,  # the generated log config writes next to the working dir
                check=True,
                capture_output=True,
            )
        overrides: dict[str, Any] = {
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(data / "homeserver.db")}},
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "presence": {"enabled": False},
            "enable_registration": False,
            "app_service_config_files": [str(p) for p in self.registration_files],
            # Without these the bridge gets no to-device events, OTK counts or device lists in
            # its transactions and cannot do end-to-end encryption without /sync.
            "experimental_features": {
                "msc2409_to_device_messages_enabled": True,
                "msc3202_transaction_extensions": True,
            },
        }
        if self.relaxed_rate_limits:
            overrides.update(RELAXED_RATE_LIMITS)
        overrides.update(self.extra_config)
        with self.overrides_path.open("w") as f:
            YAML(typ="safe").dump(overrides, f)

    def start(self, timeout: float = 90) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "synapse.app.homeserver",
                "-c",
                str(self.config_path),
                "-c",
                str(self.overrides_path),
            ],
            cwd=self.base_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop Synapse ourselves
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise SynapseError(f"Synapse exited with {code}:\n{self._tail()}")
            try:
                self.request("GET", "/_matrix/client/versions")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        self.stop()
        raise SynapseError(f"Synapse did not answer within {timeout} s:\n{self._tail()}")

    def _tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 20) -> None:
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    # Faults for the tests (tests/test_faults*.py): a frozen homeserver (its sockets still
    # accept connections, nothing answers) and a crashed one. start() brings a killed one back
    # on the same config and database.
    def pause(self) -> None:
        """SIGSTOP: Synapse stops answering without closing anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause(); harmless when Synapse is not stopped."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed. Call start() to bring it back."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")

    def _shared_secret(self) -> str:
        config = YAML(typ="safe").load(self.config_path.read_text())
        return config["registration_shared_secret"]

    def register_user(self, username: str, password: str, admin: bool = False) -> dict[str, Any]:
        """Create a user with the shared-secret admin API (no open registration needed)."""
        nonce = self.request("GET", "/_synapse/admin/v1/register")["nonce"]
        # The MAC covers the parts separated by NULs, without a trailing one.
        mac = hmac.new(
            self._shared_secret().encode(),
            b"\x00".join(
                p.encode() for p in (nonce, username, password, "admin" if admin else "notadmin")
            ),
            hashlib.sha1,
        )
        return self.request(
            "POST",
            "/_synapse/admin/v1/register",
            {
                "nonce": nonce,
                "username": username,
                "password": password,
                "admin": admin,
                "mac": mac.hexdigest(),
            },
        )

    def set_password(self, username: str, password: str) -> None:
        """Give an existing user a new password, keeping their devices.

        The admin API needs an admin's token, and the shared secret only creates users: a
        throwaway admin is made for the one call, then deactivated (and erased).
        """
        admin = f"quickstart-admin-{secrets.token_hex(4)}"
        token = self.register_user(admin, secrets.token_urlsafe(24), admin=True)["access_token"]
        user_id = quote(f"@{username}:{self.server_name}")
        try:
            self.request(
                "PUT",
                f"/_synapse/admin/v2/users/{user_id}",
                {"password": password, "logout_devices": False},
                token,
            )
        finally:
            admin_id = quote(f"@{admin}:{self.server_name}")
            path = f"/_synapse/admin/v1/deactivate/{admin_id}"
            self.request("POST", path, {"erase": True}, token)


def errcode(error: urllib.error.HTTPError) -> str | None:
    """The Matrix errcode of an error response (M_USER_IN_USE…), if it has one."""
    try:
        body = json.loads(error.read() or b"{}")
    except ValueError:
        return None
    return body.get("errcode") if isinstance(body, dict) else None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

