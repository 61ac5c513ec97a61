"""One bridge process per database: an exclusive lock held for the process's lifetime.

Two bridges on one database would both answer Synapse's transactions, both deliver the queue and
both mail the outbox: every mail twice, and two writers racing over the crypto store (a corrupted
Olm account cannot be repaired). This happens by accident (a second `systemctl start`, a copied
unit file, a test left running), so the second process refuses to start instead.

- PostgreSQL: a session-level advisory lock (``pg_try_advisory_lock``) on a connection of its own,
  kept open. Advisory locks belong to one database, so bridges on other databases of the same
  server do not collide; the server drops the lock when the connection ends, also on SIGKILL.
- SQLite: ``flock`` on ``<database path>.lock``. The kernel drops it when the process dies, so a
  crash never leaves a stale lock behind (a PID file would). flock locks belong to the open file,
  not the process, so a second lock in the same process conflicts too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import time

import asyncpg
import yarl

log = logging.getLogger("bridge.db.lock")

# The advisory lock key: fixed, so every Cloakroom version agrees on it ("Cloakroo" in ASCII).
ADVISORY_KEY = 0x436C6F616B726F6F
# mautrix's pool options, which ride in the URL's query; asyncpg.connect would reject them.
_POOL_OPTIONS = ("min_size", "max_size")
# A bridge restarted right after a crash may find its old session still being torn down by the
# server: the lock is retried this long before the database counts as in use.
PG_GRACE_SECONDS = 5.0
# The lock's session: the server probes the connection, so a bridge host that vanished (power
# loss, network gone) loses the lock within half a minute instead of the kernel's two hours;
# and a server-wide idle_session_timeout must never end this deliberately idle session.
_SESSION_SETTINGS = {
    "application_name": "cloakroom instance lock",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
}


class DatabaseInUse(Exception):
    """Another process holds the database's instance lock (the message is one sentence)."""

    def __init__(self, url: str) -> None:
        self.url = url
        super().__init__(
            f"database: {_redact(url)} is in use by another Cloakroom process; stop that one "
            "first, or give this bridge a database of its own"
        )


def _redact(url: str) -> str:
    parsed = yarl.URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


class InstanceLock:
    """The held lock; `release` gives it up (also done by the OS when the process ends)."""

    def __init__(self, url: str, fd: int | None = None,
                 conn: asyncpg.Connection | None = None) -> None:
        self.url = url
        self._fd = fd
        self._conn = conn

    @property
    def held(self) -> bool:
        return self._fd is not None or self._conn is not None

    async def release(self) -> None:
        if self._fd is not None:
            # Closing the file drops the flock. The file stays: removing it would let a third
            # process lock a new file of the same name while a second still holds the old one.
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_KEY)
            # Closing ends the session, which drops the lock whatever the unlock did.
            await conn.close(timeout=5)


async def acquire_instance_lock(url: str) -> InstanceLock:
    """Take the database's instance lock, or raise DatabaseInUse when another process has it.

    Connection errors (PostgreSQL unreachable) propagate as they are: the caller reports them as
    it reports failing to open the database.
    """
    scheme = yarl.URL(url).scheme
    if scheme in ("postgres", "postgresql"):
        return await _lock_postgres(url)
    if scheme.startswith("sqlite"):
        return _lock_sqlite(url)
    raise ValueError(f"no instance lock for database scheme {scheme!r}")


async def _lock_postgres(url: str, grace: float = PG_GRACE_SECONDS) -> InstanceLock:
    parsed = yarl.URL(url)
    dsn = str(parsed.with_query({k: v for k, v in parsed.query.items()
                                 if k not in _POOL_OPTIONS}))
    conn = await asyncpg.connect(dsn, server_settings=_SESSION_SETTINGS)
    try:
        # PostgreSQL 14+ only; older servers have no such timeout to disable.
        with contextlib.suppress(asyncpg.UndefinedObjectError):
            await conn.execute("SET idle_session_timeout = 0")
        deadline = time.monotonic() + grace
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_KEY):
            if time.monotonic() >= deadline:
                raise DatabaseInUse(url)
            await asyncio.sleep(0.25)
    except BaseException:
        await conn.close()
        raise
    return InstanceLock(url, conn=conn)


def _sqlite_path(url: str) -> str | None:
    """The database file of a sqlite URL; None for an in-memory database (nothing to share)."""
    path = yarl.URL(url).path
    return None if not path or path == ":memory:" or "mode=memory" in url else path


def _lock_sqlite(url: str) -> InstanceLock:
    path = _sqlite_path(url)
    if path is None:
        return InstanceLock(url)
    try:
        # Non-inheritable (Python's default): a child process such as gpg never keeps it alive.
        fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        # No lock file next to the database means no database there either (a missing or
        # unwritable directory): opening it fails right after, with SQLite's own clearer message.
        log.warning("Cannot create %s.lock (%s); continuing without the instance lock",
                    path, e.strerror)
        return InstanceLock(url)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise DatabaseInUse(url) from None
        raise
    return InstanceLock(url, fd=fd)
