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


# The onboarding bridge (guard on, welcome on) acts only for these users, so it never touches the
# rooms of the other tests. Each name can be registered once per session.
ONBOARDING_USERS = [f"onb{i}" for i in range(1, 21)]


def write_bridge_config(
    base: Path, hs_url: str, as_port: int, smtp_port: int, dns_port: int, relay_port: int,
    extra: dict[str, Any] | None = None, name: str = "config", metrics_port: int = 0,
) -> Path:
    config = base / f"{name}.yaml"
    config.write_text((Path(__file__).parent.parent / "config.sample.yaml").read_text())
    values: dict[str, Any] = {
        "homeserver.address": hs_url,
        "homeserver.domain": "localhost",
        "appservice.address": f"http://127.0.0.1:{as_port}",
        "appservice.port": as_port,
        "database": f"sqlite:{base / (name.replace('config', 'bridge') + '.db')}",
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
        # Welcome DMs would be invites every test's user receives; the onboarding bridge has them.
        "onboarding.welcome": False,
        # Only the main bridge serves /metrics and /health (tests/test_metrics.py); 0: off.
        "metrics.listen.port": metrics_port,
    }
    values.update(extra or {})
    write_values(config, values)
    # The registration comes from the bridge's own CLI, exactly as an admin would make it.
    registration = base / f"{name.replace('config', 'reg')}.yaml"
    subprocess.run(
        [sys.executable, "-m", "bridge", "-c", str(config), "-g", "-r", str(registration)],
        check=True,
        cwd=base,
    )
    return config


def second_bridge(name: str, bot: str, template: str, users: list[str],
                  **values: Any) -> dict[str, Any]:
    """The config of a test bridge beside the main one: its own appservice id, bot and ghost
    namespace, and permission for its own users only, so it never acts in other tests' rooms."""
    return {
        "appservice.id": f"cloakroom-{name}",
        "appservice.bot_username": bot,
        "bridge.username_template": template,
        "permissions": {"localhost": "none", **{f"@{u}:localhost": "user" for u in users}},
        **values,
    }


def onboarding_extra() -> dict[str, Any]:
    return second_bridge("onboarding", "onboarding", "_email2_{address}", ONBOARDING_USERS, **{
        "onboarding.guard": "private",
        "onboarding.welcome": True,
        "onboarding.nudge_interval_days": 7,
    })


# The strict bridge (encryption.share_with: cross-signed) acts only for these users.
STRICT_USERS = [f"strict{i}" for i in range(1, 11)]


def strict_extra() -> dict[str, Any]:
    return second_bridge("strict", "strictbot", "_email3_{address}", STRICT_USERS,
                         **{"encryption.share_with": "cross-signed"})


# The postfix bridge (LMTP behind a real Postfix, with the policy service; tests/test_postfix.py
# sets its ports) acts only for these users.
POSTFIX_USERS = [f"pf{i}" for i in range(1, 6)]


def postfix_extra() -> dict[str, Any]:
    return second_bridge("postfix", "postfixbot", "_email4_{address}", POSTFIX_USERS,
                         **{"email.listen.protocol": "lmtp"})


# The pg bridge (its database on the session's throwaway PostgreSQL server) acts only for these
# users. Its `database` is set by tests/conftest.py (`pg`) once that server runs: Synapse needs the
# registration at start, the server is only started by the first test that asks for it.
PG_USERS = [f"pg{i}" for i in range(1, 21)]
PG_PLACEHOLDER = "postgres://unset.invalid/set-by-the-pg-fixture"


def pg_extra() -> dict[str, Any]:
    return second_bridge("pg", "pgbot", "_email5_{address}", PG_USERS,
                         database=PG_PLACEHOLDER)


def start_stack(base: Path, extra: dict[str, Any] | None = None) -> Env:
    """DNS and Synapse running, the bridge configured (call env.bridge.start() to run it)."""
    hs_port, as_port, smtp_port, metrics_port = free_port(), free_port(), free_port(), free_port()
    # The bridge's only DNS: a real server on loopback whose records the tests set.
    dns = DnsServer().__enter__()
    relay = TestRelay().start()
    hs_url = f"http://127.0.0.1:{hs_port}"
    config_path = write_bridge_config(
        base, hs_url, as_port, smtp_port, dns.port, relay.port, extra, metrics_port=metrics_port
    )
    onb_port, onb_smtp = free_port(), free_port()
    onb_config = write_bridge_config(
        base, hs_url, onb_port, onb_smtp, dns.port, relay.port,
        {**onboarding_extra(), **(extra or {})}, name="config-onboarding",
    )
    strict_port, strict_smtp = free_port(), free_port()
    strict_config = write_bridge_config(
        base, hs_url, strict_port, strict_smtp, dns.port, relay.port,
        {**strict_extra(), **(extra or {})}, name="config-strict",
    )
    postfix_port, postfix_lmtp = free_port(), free_port()
    postfix_config = write_bridge_config(
        base, hs_url, postfix_port, postfix_lmtp, dns.port, relay.port,
        {**postfix_extra(), **(extra or {})}, name="config-postfix",
    )
    pg_port, pg_smtp = free_port(), free_port()
    pg_config = write_bridge_config(
        base, hs_url, pg_port, pg_smtp, dns.port, relay.port,
        {**pg_extra(), **(extra or {})}, name="config-pg",
    )
    synapse = LocalSynapse(
        base_dir=base / "synapse",
        port=hs_port,
        registration_files=[base / "reg.yaml", base / "reg-onboarding.yaml",
                            base / "reg-strict.yaml", base / "reg-postfix.yaml",
                            base / "reg-pg.yaml"],
        relaxed_rate_limits=True,
    )
    synapse.prepare()
    synapse.start()
    bridge = BridgeProcess(config_path, as_port, base / "bridge.log")
    config = YAML(typ="safe").load(config_path.read_text())
    env = Env(synapse, bridge, config, base, bot_mxid="@cloakroom:localhost",
              smtp_port=smtp_port, max_recipients=MAX_RECIPIENTS, dns=dns, relay=relay,
              metrics_port=metrics_port)
    # Started by the tests that need it (tests/conftest.py: `onboarding`).
    env.onboarding = BridgeProcess(onb_config, onb_port, base / "bridge-onboarding.log")
    env.onboarding_smtp_port = onb_smtp
    env.strict = BridgeProcess(strict_config, strict_port, base / "bridge-strict.log")
    env.strict_smtp_port = strict_smtp
    # Started by tests/test_postfix.py, after it has set the ports of its Postfix.
    env.postfix = BridgeProcess(postfix_config, postfix_port, base / "bridge-postfix.log")
    # Started by tests/conftest.py (`pg`), after it has pointed the config at PostgreSQL.
    env.pg = BridgeProcess(pg_config, pg_port, base / "bridge-pg.log")
    env.pg_smtp_port = pg_smtp
    return env


def stop_stack(env: Env) -> None:
    env.bridge.stop()
    env.onboarding.stop()
    env.strict.stop()
    if getattr(env, "postfix", None) is not None:
        env.postfix.stop()
    if getattr(env, "pg", None) is not None:
        env.pg.stop()
    env.synapse.stop()
    env.dns.__exit__(None, None, None)
    env.relay.stop()
