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

import pytest

from bridge.config import sample_text, write_values
from bridge.exitcodes import (
    EXIT_CONFIG,
    EXIT_CRYPTO,
    EXIT_DATABASE,
    EXIT_REGISTRATION_PATH,
)
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


def _cli(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd, env=_clean_env(**env),
    )


def _first_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.splitlines()[0] if proc.stderr else ""


def test_config_path_that_is_a_directory_exits_10(tmp_path: Path) -> None:
    proc = _cli("-c", str(tmp_path))
    assert proc.returncode == EXIT_CONFIG
    assert _first_line(proc) == (
        f"cloakroom: config error in {tmp_path}: config: {tmp_path} is a directory; "
        "-c takes the path of the config file"
    )


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("regdir", "regdir is a directory; -r takes the path of the file to write"),
        ("some/dir/", "some/dir/ names a directory (it ends with /)"),
        ("missing/dir/reg.yaml", "the directory missing/dir of missing/dir/reg.yaml does not"),
    ],
)
def test_generate_into_a_directory_exits_12_and_writes_nothing(
    tmp_path: Path, target: str, expected: str
) -> None:
    config = _config(tmp_path)
    (tmp_path / "regdir").mkdir()
    before = config.read_text()
    proc = _cli("-c", str(config), "-g", "--force", "-r", target, cwd=tmp_path)
    assert proc.returncode == EXIT_REGISTRATION_PATH
    assert _first_line(proc).startswith(f"cloakroom: {expected}"), proc.stderr
    # Neither half of a registration: no new tokens in the config, no temporary file left.
    assert config.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "regdir"]
    assert list((tmp_path / "regdir").iterdir()) == []


def test_a_number_where_a_section_belongs_exits_10(tmp_path: Path) -> None:
    config = _config(tmp_path)
    text = config.read_text()
    # `rate_limit: 5` instead of the section: its limits would silently be the defaults.
    start = text.index("    rate_limit:\n")
    end = text.index("\n    # Handing queued mail to Matrix.")
    config.write_text(text[:start] + "    rate_limit: 5" + text[end:])
    proc = _cli("-c", str(config))
    assert proc.returncode == EXIT_CONFIG
    assert _first_line(proc) == (
        f"cloakroom: config error in {config}: email.rate_limit: must be a mapping of keys, "
        "got an integer (5)"
    )


def test_several_config_problems_are_listed_together(tmp_path: Path) -> None:
    config = _config(
        tmp_path, **{"appservice.port": "abc", "onboarding.guard": "sometimes",
                     "email.relay.security": "ssl"},
    )
    proc = _cli("-c", str(config))
    assert proc.returncode == EXIT_CONFIG
    lines = proc.stderr.splitlines()
    assert _first_line(proc) == f"cloakroom: 3 problems in {config}, fix each of them:"
    assert lines[1:] == [
        "  appservice.port: must be an integer, got a string ('abc')",
        "  email.relay.security: must be none, starttls or tls",
        "  onboarding.guard: must be private, dm or off",
    ]


@pytest.mark.parametrize("kind", ["missing-dir", "directory", "not-a-database", "newer-schema"])
def test_unopenable_sqlite_exits_21_with_one_message(tmp_path: Path, kind: str) -> None:
    """Each a few times: the old failure (a worker thread writing to the closed event loop) was
    a race. A file that is not a database, or one a newer version wrote, used to leave a thread
    that kept the process alive after the message."""
    path = {
        "missing-dir": tmp_path / "no" / "such" / "bridge.db",
        "directory": tmp_path,
        "not-a-database": tmp_path / "garbage.db",
        "newer-schema": tmp_path / "newer.db",
    }[kind]
    reason = "unable to open database file"
    if kind == "not-a-database":
        path.write_bytes(b"this is not SQLite\n" * 300)
        reason = "file is not a database"
    if kind == "newer-schema":
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE cloakroom_version (version INTEGER)")
            conn.execute("INSERT INTO cloakroom_version VALUES (999)")
        reason = "Unsupported Cloakroom schema version v999"
    config = _config(tmp_path, database=f"sqlite:{path}")
    for _ in range(3):
        # Only the critical line: it must be the first and only thing on stderr.
        proc = _cli("-c", str(config), CLOAKROOM_LOGGING__ROOT__LEVEL="CRITICAL",
                    CLOAKROOM_LOGGING__LOGGERS__BRIDGE__LEVEL="CRITICAL")
        assert proc.returncode == EXIT_DATABASE, proc.stderr
        first = _first_line(proc)
        assert f"CRITICAL [bridge] database: cannot open sqlite:{path}: {reason}" in first
        assert proc.stderr.splitlines() == [first], "more than the one message"


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
    # The running bridge holds the database's instance lock; stop it, or the second one is
    # (rightly) refused for that before it ever reads a key.
    running.bridge.stop()
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bridge", "-c", str(config)],
            capture_output=True, text=True, timeout=60,
            env=_clean_env(
                CLOAKROOM_ENCRYPTION__PICKLE_KEY="not-the-key-the-database-was-written-with",
                CLOAKROOM_APPSERVICE__PORT=str(free_port()),
            ),
        )
    finally:
        await asyncio.to_thread(running.bridge.start)
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


def test_sighup_reopens_the_log_files(tmp_path: Path) -> None:
    """After logrotate moved the file away, SIGHUP makes the bridge write to a new one."""
    path = tmp_path / "cloakroom.log"
    config = _config(tmp_path)
    logging_config = {
        "version": 1,
        "formatters": {"normal": {"format": "%(levelname)s [%(name)s] %(message)s"}},
        "handlers": {"file": {"class": "logging.FileHandler", "formatter": "normal",
                              "filename": str(path)}},
        "root": {"level": "INFO", "handlers": ["file"]},
    }
    write_values(config, {"logging": logging_config})
    proc = subprocess.Popen([sys.executable, "-m", "bridge", "-c", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_clean_env())
    try:
        deadline = time.monotonic() + 30
        while not (path.exists() and "not reachable" in path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no log written"
            time.sleep(0.1)
        path.rename(tmp_path / "cloakroom.log.1")  # what logrotate does
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while not (path.exists() and "Reopened the log files" in path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "no new log file"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
