"""Session fixtures: one real Synapse for the whole run, and the real bridge attached to it."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from mautrix.util.async_db import Database
from yarl import URL

from bridge.db import open_database

from .element_client import ElementDevices, element_devices, node_unavailable
from .harness import Env
from .postgres import UNAVAILABLE, postgres_uri
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
async def onboarding(running: Env) -> AsyncIterator[Env]:
    """The main stack plus the onboarding bridge (guard: private, welcome on), which acts only
    for the users in tests.stack.ONBOARDING_USERS."""
    if running.onboarding.process is None or running.onboarding.process.poll() is not None:
        running.onboarding.process = None
        running.onboarding.start()
    yield running


@pytest.fixture
async def element(running: Env) -> AsyncIterator[ElementDevices]:
    """Element's crypto stack (matrix-js-sdk + Rust crypto): `await element.login(user, pw)`
    starts a new device; all are stopped after the test. Skips when Node is not installed."""
    reason = await asyncio.to_thread(node_unavailable)
    if reason:
        pytest.skip(reason)
    async with element_devices(running) as devices:
        yield devices


@pytest.fixture
async def strict(running: Env) -> AsyncIterator[Env]:
    """The main stack plus the strict bridge (encryption.share_with: cross-signed), which acts
    only for the users in tests.stack.STRICT_USERS."""
    if running.strict.process is None or running.strict.process.poll() is not None:
        running.strict.process = None
        running.strict.start()
    yield running


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


# Databases for component tests: SQLite, and PostgreSQL when one can be had.

@pytest.fixture(scope="session")
def pg_server() -> Iterator[str | None]:
    with postgres_uri() as uri:
        yield uri


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'bridge.db'}"
        return
    server: str | None = request.getfixturevalue("pg_server")
    if server is None:
        pytest.skip(UNAVAILABLE)
    # A fresh database per test, so tests stay independent.
    name = f"cloakroom_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield str(URL(server).with_path(f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    db = await open_database(db_url)
    try:
        yield db
    finally:
        await db.stop()
