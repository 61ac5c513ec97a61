"""Session fixtures: one real Synapse for the whole run, and the real bridge attached to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from .harness import Env
from .stack import start_stack, stop_stack


@pytest.fixture(scope="session")
def synapse_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    env = start_stack(tmp_path_factory.mktemp("cloakroom"))
    try:
        yield env
    finally:
        stop_stack(env)


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
