"""The bridge database: our own tables, mautrix's state cache and the crypto store, one file.

SQLite by default (``sqlite:PATH``), PostgreSQL by URI (``postgres://…``), with the same code.
"""

from __future__ import annotations

import contextlib
import logging
import os

import mautrix.util.async_db.aiosqlite  # noqa: F401  (registers the sqlite scheme)
import mautrix.util.async_db.asyncpg  # noqa: F401  (registers the postgres scheme)
import yarl
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import PgCryptoStore
from mautrix.util.async_db import Database

from .state import BridgeState, TxnLog
from .upgrade import upgrade_table

__all__ = ["BridgeState", "TxnLog", "open_database", "upgrade_table"]


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
        log=logging.getLogger("bridge.db"),
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
    await PgStateStore.upgrade_table.upgrade(db)
    await PgCryptoStore.upgrade_table.upgrade(db)
    return db
