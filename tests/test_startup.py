"""Start-up failures: each stops the bridge with its own exit code and names the cause."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bridge.config import sample_text, write_values
from bridge.exitcodes import EXIT_CRYPTO, EXIT_DATABASE
from bridge.quickstart.synapse import free_port

from .harness import Env, open_dm_with_bot


def _config(tmp_path: Path, **values: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(sample_text())
    base: dict[str, object] = {
        "homeserver.address": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "homeserver.domain": "localhost",
        "appservice.address": "http://127.0.0.1:29400",
        "appservice.port": free_port(),
        "appservice.as_token": "a" * 20,
        "appservice.hs_token": "b" * 20,
        "encryption.pickle_key": "c" * 20,
        "database": f"sqlite:{tmp_path / 'bridge.db'}",
    }
    base.update(values)
    write_values(path, base)
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOAKROOM_")}
    env.update(extra)
    return env


def test_unreachable_database_exits_21_naming_the_key(tmp_path: Path) -> None:
    config = _config(tmp_path, database=f"postgres://nobody:secret@127.0.0.1:{free_port()}/x")
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "-c", str(config)],
        capture_output=True, text=True, timeout=60, env=_clean_env(),
    )
    assert proc.returncode == EXIT_DATABASE, proc.stderr
    assert "database: cannot open" in proc.stderr
    assert "secret" not in proc.stderr, "the database password leaked into the log"


def test_stop_signal_interrupts_waiting_for_the_homeserver(tmp_path: Path) -> None:
    config = _config(tmp_path)
    log = tmp_path / "bridge.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "-c", str(config)],
            stdout=out, stderr=subprocess.STDOUT, env=_clean_env(),
        )
    deadline = time.monotonic() + 30
    while "not reachable" not in log.read_text() and time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    assert "not reachable" in log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0, log.read_text()


async def test_wrong_pickle_key_exits_20_and_names_the_key(running: Env) -> None:
    """A second bridge process on the same database with another pickle key must refuse."""
    config = running.bridge.config_path
    db = running.base_dir / "bridge.db"

    def account() -> tuple:
        with sqlite3.connect(db) as conn:
            return conn.execute(
                "SELECT device_id, account FROM crypto_account WHERE account_id=?",
                (running.bot_mxid,),
            ).fetchone()

    before = account()
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bridge", "-c", str(config)],
        capture_output=True, text=True, timeout=60,
        env=_clean_env(
            CLOAKROOM_ENCRYPTION__PICKLE_KEY="not-the-key-the-database-was-written-with",
            CLOAKROOM_APPSERVICE__PORT=str(free_port()),
        ),
    )
    assert proc.returncode == EXIT_CRYPTO, proc.stderr[-3000:]
    assert "encryption.pickle_key does not decrypt" in proc.stderr
    # Refusing is all it did: the stored identity is untouched.
    assert account() == before
    # The running bridge is unaffected.
    alice = await running.new_user()
    await open_dm_with_bot(alice, running.bot_mxid)


async def test_bot_leaves_when_everyone_else_has_left(running: Env) -> None:
    alice = await running.new_user()
    room_id = await open_dm_with_bot(alice, running.bot_mxid)
    await alice.room_leave(room_id)
    # Read the bot's own membership as the bot (a user who left sees the state at their leave).
    path = f"/_matrix/client/v3/rooms/{room_id}/state/m.room.member/{running.bot_mxid}"
    token = running.config["appservice"]["as_token"]
    deadline = time.monotonic() + 20
    membership = "join"
    while membership != "leave" and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        state = await asyncio.to_thread(running.synapse.request, "GET", path, None, token)
        membership = state.get("membership")
    assert membership == "leave", "the bot stayed alone in the room"
