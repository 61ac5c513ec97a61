"""mautrix's SQLite pool, made to clean up after itself when opening the database fails.

Two bugs below us turned an unopenable SQLite path into more than the one sentence it deserves:

* aiosqlite: when ``sqlite3.connect`` fails, ``Connection._connect`` queues the stop of its
  worker thread and raises without waiting for it. The thread then reports the stop to the event
  loop; if ``asyncio.run`` has closed the loop by then (start-up failed, so it closes at once) the
  thread dies with "RuntimeError: Event loop is closed" on stderr, after the right message.
* mautrix: when an init command fails (a file that is not a database: the first PRAGMA reads it),
  ``SQLiteDatabase.start`` drops the connection without closing it. Its worker thread is not a
  daemon, so the process printed the error and then never exited.

:class:`SQLiteDatabase` opens each connection itself and, on failure, closes what it opened and
waits for every worker thread to finish while the loop still runs. :func:`register` installs it
for the ``sqlite:`` schemes; ``Database.create`` then uses it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3

from mautrix.util.async_db import Database
from mautrix.util.async_db.aiosqlite import SQLiteDatabase as MautrixSQLiteDatabase
from mautrix.util.async_db.aiosqlite import TxnConnection


async def _discard(conn: TxnConnection) -> None:
    """Close a connection that failed half-way and wait until its worker thread has ended."""
    if conn._connection is not None:  # connected, an init command failed
        await conn.close()  # queues the thread's stop and waits for it
    # Connecting failed: aiosqlite queued the stop itself. The thread ends right after it runs;
    # joined here, it reports to a loop that is still open.
    if conn._thread.is_alive():
        await asyncio.to_thread(conn._thread.join)


class SQLiteDatabase(MautrixSQLiteDatabase):
    async def start(self) -> None:
        if self._parent or self._conns or self._stopped:
            await super().start()  # a shared pool, or the errors mautrix raises for misuse
            return
        self.log.debug(f"Connecting to {self.url}")
        if os.path.exists(self._path):
            if not os.access(self._path, os.W_OK):
                self.log.warning("Database file doesn't seem writable")
        elif not os.access(os.path.dirname(os.path.abspath(self._path)), os.W_OK):
            self.log.warning("Database file doesn't exist and directory doesn't seem writable")
        try:
            for _ in range(self._pool.maxsize):
                self._pool.put_nowait(await self._open_connection())
                self._conns += 1
            # What mautrix's Database.start does after connecting: the schema upgrade.
            await Database.start(self)
        except BaseException:
            await self.stop()  # the connections already in the pool
            raise

    async def _open_connection(self) -> TxnConnection:
        conn = TxnConnection(self._path, **self._db_args)
        try:
            await conn
            if self._init_commands:
                cur = await conn.cursor()
                for command in self._init_commands:
                    self.log.trace("Executing init command: %s", command)
                    await cur.execute(command)
                await conn.commit()
        except BaseException:
            await _discard(conn)
            raise
        conn.row_factory = sqlite3.Row
        return conn


def register() -> None:
    """Use this pool for sqlite: URLs from now on (Database.create looks the scheme up)."""
    Database.schemes["sqlite"] = SQLiteDatabase
    Database.schemes["sqlite3"] = SQLiteDatabase
