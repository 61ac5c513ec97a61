"""A throwaway PostgreSQL server for the test session (or the one named by TEST_POSTGRES_URI)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bridge.quickstart.synapse import free_port

USER = "cloakroom"
DATABASE = "cloakroom_test"
UNAVAILABLE = (
    "PostgreSQL unavailable: set TEST_POSTGRES_URI, or install the server "
    "(scripts/system-deps.sh as root)"
)


def find_bin_dir() -> Path | None:
    """The bin directory of the newest installed server: Debian's layout first, then PATH."""
    debian = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    debian.sort(key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else -1)
    candidates = debian[::-1]
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    return next((d for d in candidates if (d / "pg_ctl").exists()), None)


def _runner() -> list[str] | None:
    """initdb refuses to run as root: as root, run the server as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    return ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else None


@contextmanager
def postgres_uri() -> Iterator[str | None]:
    """Yield a URI to a database on a running server, or None (tests skip with UNAVAILABLE)."""
    if uri := os.environ.get("TEST_POSTGRES_URI"):
        yield uri
        return
    bin_dir, runner = find_bin_dir(), _runner()
    if bin_dir is None or runner is None:
        yield None
        return
    # Not under pytest's tmp dir: its parents are 0700 and the postgres user could not enter.
    base = Path(tempfile.mkdtemp(prefix="cloakroom-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run([*runner, *args], cwd=base, check=True, capture_output=True, text=True)

    try:
        # C locale with UTF8: independent of whatever locales the machine has generated.
        flags = ["--auth=trust", "-U", USER, "-E", "UTF8", "--locale=C", "--no-sync"]
        run(str(bin_dir / "initdb"), "-D", str(data), *flags)
        # -l: without a log file the server would inherit (and hold open) our capture pipes.
        options = f"-h 127.0.0.1 -p {port} -k {base} -F"
        log = str(base / "server.log")
        run(str(bin_dir / "pg_ctl"), "start", "-w", "-D", str(data), "-l", log, "-o", options)
        _wait_and_create(bin_dir, port)
    except BaseException as e:
        server_log = base / "server.log"
        detail = server_log.read_text() if server_log.exists() else ""
        _stop(runner, bin_dir, base)
        if isinstance(e, subprocess.CalledProcessError):
            raise RuntimeError(f"{e.cmd} failed:\n{e.stdout}{e.stderr}{detail}") from e
        raise
    try:
        yield f"postgres://{USER}@127.0.0.1:{port}/{DATABASE}"
    finally:
        _stop(runner, bin_dir, base)


def _stop(runner: list[str], bin_dir: Path, base: Path) -> None:
    if (base / "data" / "postmaster.pid").exists():
        stop = [*runner, str(bin_dir / "pg_ctl"), "stop", "-m", "fast", "-D", str(base / "data")]
        subprocess.run(stop, cwd=base, capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def _wait_and_create(bin_dir: Path, port: int) -> None:
    conn = ["-h", "127.0.0.1", "-p", str(port), "-U", USER]
    deadline = time.monotonic() + 30
    while subprocess.run([bin_dir / "pg_isready", "-q", *conn]).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL on port {port} did not accept connections")
        time.sleep(0.1)
    createdb = [bin_dir / "createdb", *conn, DATABASE]
    subprocess.run(createdb, check=True, capture_output=True, text=True)
