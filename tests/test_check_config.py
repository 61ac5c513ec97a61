"""`python -m bridge check-config`: every config problem at once, then each service, one line each.

Against the real test stack: its Synapse, the running bridge's database and the test relay.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from bridge.config import sample_text, write_values
from bridge.db.upgrade import upgrade_table
from bridge.exitcodes import EXIT_CONFIG, EXIT_SERVICE
from bridge.quickstart.synapse import free_port

from .harness import Env

LATEST = len(upgrade_table.upgrades)


async def _check(config: Path, *before: str, **env: str) -> tuple[int, list[str]]:
    """Run the real CLI; (exit code, stdout lines). stderr must stay empty."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CLOAKROOM_")}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bridge", *before, "check-config", "-c", str(config)],
        capture_output=True, text=True, timeout=120, env={**clean, **env},
    )
    assert proc.stderr == "", proc.stderr
    return proc.returncode, proc.stdout.splitlines()


async def test_a_working_stack_is_all_ok(running: Env) -> None:
    config = running.bridge.config_path
    code, lines = await _check(config)
    assert len(lines) == 4, lines
    assert lines[0] == f"ok: {config} is a valid configuration"
    # The Matrix version is Synapse's to choose.
    assert lines[1].startswith(f"ok: homeserver {running.synapse.url} answers (Matrix v1.")
    assert lines[1].endswith(f") and accepts appservice.as_token for {running.bot_mxid}")
    assert lines[2] == (
        f"ok: database sqlite:{running.base_dir / 'bridge.db'} opens, schema version {LATEST}, "
        "up to date"
    )
    assert lines[3] == f"ok: relay 127.0.0.1:{running.relay.port} (none) answers: relay.test"
    assert code == 0


async def test_a_token_the_homeserver_does_not_know(running: Env) -> None:
    code, lines = await _check(
        running.bridge.config_path, CLOAKROOM_APPSERVICE__AS_TOKEN="not-the-registered-token"
    )
    assert code == EXIT_SERVICE
    assert lines[1].startswith(
        f"problem: appservice.as_token: the homeserver at {running.synapse.url} does not accept "
        "it (401 M_UNKNOWN_TOKEN"
    ), lines
    # The other services are still checked.
    assert lines[2].startswith("ok: database") and lines[3].startswith("ok: relay")


async def test_relay_problems_name_the_key(running: Env) -> None:
    config = running.bridge.config_path
    # The test relay offers no STARTTLS: a relay configured for it must not pass as fine.
    code, lines = await _check(config, CLOAKROOM_EMAIL__RELAY__SECURITY="starttls")
    assert code == EXIT_SERVICE
    assert lines[3] == (
        f"problem: email.relay.host: the relay 127.0.0.1:{running.relay.port} (starttls) does not "
        "answer as configured (it does not offer STARTTLS)"
    )
    port = free_port()  # nothing listens there
    code, lines = await _check(config, CLOAKROOM_EMAIL__RELAY__PORT=str(port))
    assert code == EXIT_SERVICE
    assert lines[3].startswith(
        f"problem: email.relay.host: the relay 127.0.0.1:{port} (none) does not answer"
    )
    code, lines = await _check(config, CLOAKROOM_EMAIL__RELAY__HOST="")
    assert code == 0
    assert lines[3] == (
        "ok: relay not checked: email.relay.host is empty, so mail written in Matrix is not sent"
    )


async def test_database_checks_read_and_never_create(running: Env, tmp_path: Path) -> None:
    config = running.bridge.config_path
    fresh = tmp_path / "new.db"
    code, lines = await _check(config, CLOAKROOM_DATABASE=f"sqlite:{fresh}")
    assert code == 0
    assert lines[2] == (
        f"ok: database sqlite:{fresh} does not exist yet; the bridge creates it at its first start"
    )
    assert not fresh.exists(), "checking created the database"
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not SQLite at all\n" * 200)
    code, lines = await _check(config, CLOAKROOM_DATABASE=f"sqlite:{garbage}")
    assert code == EXIT_SERVICE
    assert lines[2] == (
        f"problem: database: cannot read {garbage} (file is not a database); "
        "is it the bridge's database?"
    )


async def test_an_unreachable_homeserver(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(sample_text())
    address = f"http://127.0.0.1:{free_port()}"
    write_values(config, {
        "homeserver.address": address, "homeserver.domain": "localhost",
        "appservice.as_token": "a" * 20, "appservice.hs_token": "b" * 20,
        "encryption.pickle_key": "c" * 20, "database": f"sqlite:{tmp_path / 'bridge.db'}",
    })
    # -c before the command works as well as after it.
    code, lines = await _check(config, "-c", "ignored-when-given-after.yaml")
    assert code == EXIT_SERVICE
    assert lines[1].startswith(f"problem: homeserver.address: {address} does not answer")


async def test_three_problems_are_reported_together(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(sample_text())
    write_values(config, {
        "homeserver.address": "http://127.0.0.1:8008", "homeserver.domain": "localhost",
        "appservice.hs_token": "b" * 20, "encryption.pickle_key": "c" * 20,
        # 1: the as_token is left the placeholder; 2: a port that is no port; 3: a number where
        # the rate_limit section belongs.
        "appservice.port": 70000,
        "email.rate_limit": 5,
    })
    code, lines = await _check(config)
    assert code == EXIT_CONFIG
    assert lines == [
        "problem: email.rate_limit: must be a mapping of keys, got an integer (5)",
        "problem: appservice.as_token: still the placeholder; run `python -m bridge -g` to "
        "generate it",
        "problem: appservice.port: must be a TCP port, got 70000",
        f"3 problems in {config}; the services are checked once the configuration is valid",
    ]
