"""One bridge per database: the instance lock (bridge/db/lock.py), on SQLite and PostgreSQL.

Each test runs on both databases (the `db_url` fixture). Processes are real: the holder is a
child that prints `locked` once it has the lock and keeps it until its stdin closes, so the tests
synchronise on its output, never on time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest

from bridge.db.lock import DatabaseInUse, acquire_instance_lock
from bridge.exitcodes import EXIT_DATABASE

from .test_startup import _cli, _config

# A bridge-sized stand-in: takes the lock as the bridge does at start, reports as it would.
HOLDER = """
import asyncio, sys
from bridge.db.lock import DatabaseInUse, acquire_instance_lock

async def main() -> int:
    try:
        lock = await acquire_instance_lock(sys.argv[1])
    except DatabaseInUse as e:
        print(e, file=sys.stderr)
        return 21
    print("locked", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await lock.release()
    return 0

sys.exit(asyncio.run(main()))
"""


@contextmanager
def holder(url: str) -> Iterator[subprocess.Popen[str]]:
    """A second process holding the lock for the duration of the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line == "locked\n", (line, proc.stderr.read() if proc.stderr else "")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def contender(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", HOLDER, url], input="", capture_output=True,
                          text=True, timeout=60)


async def test_a_second_lock_in_the_same_process_is_refused(db_url: str) -> None:
    first = await acquire_instance_lock(db_url)
    assert first.held
    try:
        with pytest.raises(DatabaseInUse) as refused:
            await acquire_instance_lock(db_url)
        assert str(refused.value).startswith(f"database: {db_url} is in use")
    finally:
        await first.release()
    again = await acquire_instance_lock(db_url)
    await again.release()
    await again.release()  # idempotent: a stop after a failed start may release twice


async def test_a_second_process_is_refused_with_exit_21_and_one_sentence(db_url: str) -> None:
    with holder(db_url):
        proc = await asyncio.to_thread(contender, db_url)
        assert proc.returncode == EXIT_DATABASE, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and db_url in lines[0], proc.stderr
        with pytest.raises(DatabaseInUse):
            await acquire_instance_lock(db_url)
    # The holder is gone (its stdin closed or killed): the lock is free again.
    lock = await acquire_instance_lock(db_url)
    await lock.release()


async def test_a_killed_holder_leaves_no_stale_lock(db_url: str) -> None:
    # PostgreSQL ends the dead holder's session asynchronously: the lock's grace period covers it.
    with holder(db_url) as proc:
        proc.kill()
        proc.wait(10)
    lock = await acquire_instance_lock(db_url)
    await lock.release()


async def test_postgres_waits_out_a_holder_that_stops_within_the_grace(db_url: str) -> None:
    """A bridge restarted while its predecessor is still shutting down is not refused."""
    if not db_url.startswith("postgres"):
        pytest.skip("the grace period is PostgreSQL's (a flock is gone with its process)")
    with holder(db_url) as proc:
        waiting = asyncio.create_task(acquire_instance_lock(db_url))
        # Once the waiter has been refused once (it is in its retry loop), the holder lets go.
        await _lock_attempted(db_url)
        assert proc.stdin is not None
        proc.stdin.close()
        lock = await waiting
    assert lock.held
    await lock.release()


async def _lock_attempted(url: str) -> None:
    """Wait (by watching pg_stat_activity, not the clock) until a second session has tried."""
    conn = await asyncpg.connect(url)
    try:
        deadline = time.monotonic() + 10
        while await conn.fetchval(
            # The holder's last statement was its try too; the waiter's, once it has tried.
            "SELECT COUNT(*) FROM pg_stat_activity WHERE application_name = "
            "'cloakroom instance lock' AND query LIKE '%pg_try_advisory_lock%'"
        ) < 2:
            assert time.monotonic() < deadline, "the second lock never connected"
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


async def test_a_clean_release_frees_the_lock_at_once(db_url: str) -> None:
    with holder(db_url) as proc:
        assert proc.stdin is not None
        proc.stdin.close()  # the holder releases and exits 0
        assert proc.wait(10) == 0
    # Released by the holder itself (unlock, then close): no waiting needed.
    lock = await acquire_instance_lock(db_url)
    await lock.release()


async def test_databases_side_by_side_do_not_collide(tmp_path: Path) -> None:
    one = await acquire_instance_lock(f"sqlite:{tmp_path / 'one.db'}")
    two = await acquire_instance_lock(f"sqlite:{tmp_path / 'two.db'}")
    assert one.held and two.held
    await one.release()
    await two.release()


def _bridge_wired() -> bool:
    app = Path(__file__).parent.parent / "bridge" / "app.py"
    return "acquire_instance_lock" in app.read_text()


@pytest.mark.skipif(not _bridge_wired(), reason="bridge/app.py does not take the lock yet")
def test_the_bridge_refuses_a_locked_database_with_exit_21(tmp_path: Path, db_url: str) -> None:
    url = db_url
    config = _config(tmp_path, database=url)
    with holder(url):
        proc = _cli("-c", str(config), CLOAKROOM_LOGGING__ROOT__LEVEL="CRITICAL",
                    CLOAKROOM_LOGGING__LOGGERS__BRIDGE__LEVEL="CRITICAL")
    assert proc.returncode == EXIT_DATABASE, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert f"database: {url} is in use by another Cloakroom process" in line
