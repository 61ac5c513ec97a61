"""Session fixtures: one real Synapse for the whole run, and the real bridge attached to it."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from mautrix.util.async_db import Database
from ruamel.yaml import YAML
from yarl import URL

from bridge.config import write_values
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


# The pg bridge: the integration tests again, with the bridge's database on PostgreSQL.

@pytest.fixture(scope="session")
async def pg_bridge_database(synapse_env: Env, pg_server: str | None) -> AsyncIterator[str]:
    """A fresh database on the session's PostgreSQL server, written into the pg bridge's config.
    Set up after the stack and the server, so torn down before them: the bridge stops first."""
    if pg_server is None:
        pytest.skip(UNAVAILABLE)
    name = f"cloakroom_e2e_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = str(URL(pg_server).with_path(f"/{name}"))
    write_values(synapse_env.pg.config_path, {"database": url})
    try:
        yield url
    finally:
        synapse_env.pg.stop()


@pytest.fixture
async def pg(running: Env, pg_bridge_database: str) -> AsyncIterator[Env]:
    """The pg bridge running, seen as an Env of its own (its SMTP port, bot and config), which
    acts only for the users in tests.stack.PG_USERS. Its nio clients are closed afterwards."""
    process = running.pg
    if process.process is None or process.process.poll() is not None:
        process.process = None
        await asyncio.to_thread(process.start)
    config = YAML(typ="safe").load(process.config_path.read_text())
    view = dataclasses.replace(
        running, bridge=process, config=config, smtp_port=running.pg_smtp_port,
        bot_mxid=f"@{config['appservice']['bot_username']}:localhost", clients=[],
    )
    try:
        yield view
    finally:
        await view.close()
