"""`python -m bridge.quickstart --database postgres://…`: the quickstart on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from ruamel.yaml import YAML
from yarl import URL

from bridge.quickstart.__main__ import _bridge_config, parse_args
from bridge.quickstart.synapse import free_port

from .harness import from_sender, open_dm_with_bot, send_text, sync_until
from .postgres import UNAVAILABLE
from .test_quickstart import _login, _stop


def _database(config: Path) -> str:
    return YAML(typ="safe").load(config.read_text())["database"]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("CLOAKROOM_")]:
        monkeypatch.delenv(name)


def test_the_database_given_is_kept_until_another_is_given(tmp_path: Path,
                                                           clean_env: None) -> None:
    state = tmp_path / "state"
    state.mkdir()
    url = "postgres://cloakroom:secret@db.example.org/cloakroom"
    config = _bridge_config(state, 8008, 29400, 2525, 2526, url)
    assert _database(config) == url
    # A plain `make run` afterwards stays on PostgreSQL: an empty SQLite file would be a new bot.
    _bridge_config(state, 8008, 29400, 2525, 2526)
    assert _database(config) == url
    other = f"sqlite:{tmp_path / 'elsewhere.db'}"
    _bridge_config(state, 8008, 29400, 2525, 2526, other)
    assert _database(config) == other


def test_without_database_it_is_sqlite_in_the_state_directory(tmp_path: Path,
                                                               clean_env: None) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = _bridge_config(state, 8008, 29400, 2525, 2526)
    assert _database(config) == f"sqlite:{state / 'cloakroom.db'}"


def test_a_database_that_is_not_a_url_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--database", "mysql://somewhere/db"])
    assert exited.value.code == 2
    assert "is not a database URL" in capsys.readouterr().err


@pytest.fixture
async def fresh_pg_database(pg_server: str | None) -> AsyncIterator[str]:
    if pg_server is None:
        pytest.skip(UNAVAILABLE)
    name = f"cloakroom_qs_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield str(URL(pg_server).with_path(f"/{name}"))
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _start(state: Path, ports: list[int], database: str) -> subprocess.Popen[str]:
    hs, as_, smtp, sink = (str(p) for p in ports)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.quickstart", "--dir", str(state), "--hs-port", hs,
         "--as-port", as_, "--smtp-port", smtp, "--sink-port", sink, "--database", database],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )
    assert proc.stdout is not None
    output, deadline = [], time.monotonic() + 120
    for line in proc.stdout:
        output.append(line)
        if "Press Ctrl-C to stop." in line:
            return proc
        assert time.monotonic() < deadline, "".join(output)
    raise AssertionError(f"quickstart exited with {proc.wait()}:\n{''.join(output)}")


@pytest.mark.postgres
async def test_the_quickstart_runs_on_postgres(tmp_path: Path, fresh_pg_database: str) -> None:
    state = tmp_path / "state"
    ports = [free_port() for _ in range(4)]
    proc = await asyncio.to_thread(_start, state, ports, fresh_pg_database)
    try:
        facts = json.loads((state / "quickstart.json").read_text())
        client = await _login(facts, tmp_path / "nio")
        try:
            room_id = await open_dm_with_bot(client, facts["bot"])
            await send_text(client, room_id, "help")
            _, reply = await sync_until(client, from_sender(room_id, facts["bot"]))
            assert reply.decrypted and "Cloakroom commands" in reply.body
        finally:
            await client.close()
        conn = await asyncpg.connect(fresh_pg_database)
        try:
            bot = await conn.fetchval("SELECT account_id FROM crypto_account WHERE account_id=$1",
                                      facts["bot"])
        finally:
            await conn.close()
        assert bot == facts["bot"], "the bot's keys are not in PostgreSQL"
        assert not (state / "cloakroom.db").exists()
    finally:
        assert _stop(proc) == 0
