"""The whole test stack: DNS, Synapse and the bridge, as the suite and the benches use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from bridge.config import write_values
from bridge.quickstart.synapse import LocalSynapse, free_port

from .dnsserver import DnsServer
from .harness import BridgeProcess, Env
from .relay import TestRelay

MAX_RECIPIENTS = 5
# Small, so the rate-limit test can watch sending stop and resume within a test.
OUTBOUND_LIMIT = 5
OUTBOUND_WINDOW = 20


def write_bridge_config(
    base: Path, hs_url: str, as_port: int, smtp_port: int, dns_port: int, relay_port: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    config = base / "config.yaml"
    config.write_text((Path(__file__).parent.parent / "config.sample.yaml").read_text())
    values: dict[str, Any] = {
        "homeserver.address": hs_url,
        "homeserver.domain": "localhost",
        "appservice.address": f"http://127.0.0.1:{as_port}",
        "appservice.port": as_port,
        "database": f"sqlite:{base / 'bridge.db'}",
        "permissions": {
            "localhost": "user",
            "@outsider:localhost": "none",
            "@outsider2:localhost": "none",
        },
        "email.listen.port": smtp_port,
        "email.max_recipients": MAX_RECIPIENTS,
        "email.auth.dns_servers": ["127.0.0.1"],
        "email.auth.dns_port": dns_port,
        "email.auth.dns_timeout": 0.5,
        "email.relay.host": "127.0.0.1",
        "email.relay.port": relay_port,
        "email.relay.security": "none",
        "email.outbound.rate_limit": OUTBOUND_LIMIT,
        "email.outbound.rate_window_seconds": OUTBOUND_WINDOW,
    }
    values.update(extra or {})
    write_values(config, values)
    # The registration comes from the bridge's own CLI, exactly as an admin would make it.
    subprocess.run(
        [sys.executable, "-m", "bridge", "-c", str(config), "-g", "-r", str(base / "reg.yaml")],
        check=True,
        cwd=base,
    )
    return config


def start_stack(base: Path, extra: dict[str, Any] | None = None) -> Env:
    """DNS and Synapse running, the bridge configured (call env.bridge.start() to run it)."""
    hs_port, as_port, smtp_port = free_port(), free_port(), free_port()
    # The bridge's only DNS: a real server on loopback whose records the tests set.
    dns = DnsServer().__enter__()
    relay = TestRelay().start()
    config_path = write_bridge_config(
        base, f"http://127.0.0.1:{hs_port}", as_port, smtp_port, dns.port, relay.port, extra
    )
    synapse = LocalSynapse(
        base_dir=base / "synapse",
        port=hs_port,
        registration_files=[base / "reg.yaml"],
        relaxed_rate_limits=True,
    )
    synapse.prepare()
    synapse.start()
    bridge = BridgeProcess(config_path, as_port, base / "bridge.log")
    config = YAML(typ="safe").load(config_path.read_text())
    return Env(synapse, bridge, config, base, bot_mxid="@cloakroom:localhost",
               smtp_port=smtp_port, max_recipients=MAX_RECIPIENTS, dns=dns, relay=relay)


def stop_stack(env: Env) -> None:
    env.bridge.stop()
    env.synapse.stop()
    env.dns.__exit__(None, None, None)
    env.relay.stop()
