"""Session fixtures: one real Synapse for the whole run, and the real bridge attached to it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from bridge.config import write_values
from bridge.quickstart.synapse import LocalSynapse, free_port

from .harness import BridgeProcess, Env


def _write_bridge_config(base: Path, hs_url: str, as_port: int) -> Path:
    config = base / "config.yaml"
    config.write_text((Path(__file__).parent.parent / "config.sample.yaml").read_text())
    write_values(
        config,
        {
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
        },
    )
    # The registration comes from the bridge's own CLI, exactly as an admin would make it.
    subprocess.run(
        [sys.executable, "-m", "bridge", "-c", str(config), "-g", "-r", str(base / "reg.yaml")],
        check=True,
        cwd=base,
    )
    return config


@pytest.fixture(scope="session")
def synapse_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("cloakroom")
    hs_port, as_port = free_port(), free_port()
    config_path = _write_bridge_config(base, f"http://127.0.0.1:{hs_port}", as_port)
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
    env = Env(synapse, bridge, config, base, bot_mxid="@cloakroom:localhost")
    try:
        yield env
    finally:
        bridge.stop()
        synapse.stop()


@pytest.fixture(scope="session")
def env(synapse_env: Env) -> Iterator[Env]:
    """The homeserver with the bridge running (restarted if a test stopped it)."""
    if synapse_env.bridge.process is None:
        synapse_env.bridge.start()
    yield synapse_env
    # Tests that stop or kill the bridge leave it to the next use of this fixture to restart.


@pytest.fixture
async def running(env: Env) -> AsyncIterator[Env]:
    """Per test: make sure the bridge runs, and close the test's nio clients afterwards."""
    if env.bridge.process is None or env.bridge.process.poll() is not None:
        env.bridge.process = None
        env.bridge.start()
    try:
        yield env
    finally:
        await env.close()
