"""The bridge database: our own tables, mautrix's state cache and the crypto store, one file.

SQLite by default (``sqlite:PATH``), PostgreSQL by URI (``postgres://…``), with the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable

import mautrix.util.async_db.aiosqlite  # noqa: F401  (registers the sqlite scheme)
import mautrix.util.async_db.asyncpg  # noqa: F401  (registers the postgres scheme)
import yarl
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import PgCryptoStore
from mautrix.util.async_db import Database, Scheme

from .. import sqlite_pool
from .lock import DatabaseInUse, InstanceLock, acquire_instance_lock
from .state import BridgeState, TxnLog
from .upgrade import upgrade_table

# Our SQLite pool closes what it opened, also when opening fails (see bridge/sqlite_pool.py).
sqlite_pool.register()

__all__ = [
    "BridgeState",
    "DatabaseInUse",
    "InstanceLock",
    "TxnLog",
    "acquire_instance_lock",
    "checkpoint_wal",
    "is_sqlite",
    "open_database",
    "upgrade_table",
    "vacuum",
]

log = logging.getLogger("bridge.db")


def _restrict_sqlite_files(path: str) -> None:
    """The database holds encrypted keys and sealed secrets: readable by its owner only."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.chmod(path + suffix, 0o600)


async def open_database(url: str) -> Database:
    """Open the database and bring all three schemas to their latest version."""
    db = Database.create(
        url,
        upgrade_table=upgrade_table,
        log=log,
        # mautrix turns WAL on with synchronous=NORMAL, which can lose the last commits on power
        # loss; the bridge acknowledges mail only after a commit, so it must really be on disk.
        # secure_delete: a delivered mail's raw text is overwritten, not left in free pages.
        db_args={"init_commands": ["PRAGMA synchronous = FULL", "PRAGMA secure_delete = ON"]}
        if url.startswith("sqlite")
        else None,
    )
    await db.start()
    if url.startswith("sqlite"):
        _restrict_sqlite_files(yarl.URL(url).path)
    try:
        await PgStateStore.upgrade_table.upgrade(db)
        await PgCryptoStore.upgrade_table.upgrade(db)
    except BaseException:
        # Close what was opened: left open, its connection threads outlive the loop.
        await db.stop()
        raise
    return db


def is_sqlite(db: Database) -> bool:
    return db.scheme == Scheme.SQLITE


async def checkpoint_wal(db: Database) -> bool:
    """SQLite: move the write-ahead log into the database file and truncate it to zero bytes.

    With secure_delete, a deleted row is zeroed in the database file, but the WAL still holds the
    page versions written before the delete until it is truncated: this is what makes a delivered
    mail's bytes leave the disk. True when the WAL is empty afterwards (False: a reader held it;
    the next call retries). A no-op on PostgreSQL.
    """
    if not is_sqlite(db):
        return True
    busy, wal_frames, _checkpointed = await db.fetchrow("PRAGMA wal_checkpoint(TRUNCATE)")
    if busy:
        log.debug("WAL checkpoint blocked (%d frames stay until the next one)", wal_frames)
    return not busy


async def vacuum(db: Database, tables: Iterable[str]) -> None:
    """PostgreSQL: VACUUM tables, so deleted rows' dead tuples become free space sooner than
    autovacuum would get to them. A no-op on SQLite (secure_delete zeroes deleted rows there)."""
    if is_sqlite(db):
        return
    for table in tables:
        # Plain VACUUM takes no exclusive lock: the bridge keeps working while it runs. It cannot
        # run inside a transaction; db.execute runs outside one.
        await db.execute(f"VACUUM {table}")
