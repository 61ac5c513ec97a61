"""Small persistent facts: bridge key/value state and the processed-transaction log."""

from __future__ import annotations

from mautrix.util.async_db import Database

from ..worker import now_ms


class BridgeState:
    """A key/value table for facts the bridge must remember across restarts."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, key: str) -> str | None:
        return await self.db.fetchval("SELECT value FROM bridge_state WHERE key=$1", key)

    async def set(self, key: str, value: str) -> None:
        await self.db.execute(
            "INSERT INTO bridge_state (key, value) VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value=excluded.value",
            key,
            value,
        )


class TxnLog:
    """Appservice transaction ids that were fully handled."""

    # Synapse retries a failed transaction for hours at most; a week is plenty.
    RETENTION_MS = 7 * 24 * 3600 * 1000

    def __init__(self, db: Database) -> None:
        self.db = db

    async def seen(self, txn_id: str, digest: str | None = None) -> bool:
        """Whether this transaction — this id with this content (None: any) — was handled.
        Rows from before digests were kept match any content."""
        row = await self.db.fetchval(
            "SELECT digest FROM appservice_txn WHERE txn_id=$1", txn_id
        )
        return row is not None and (digest is None or row in ("", digest))

    async def mark(self, txn_id: str, digest: str = "") -> None:
        now = now_ms()
        # A reused id (new content) replaces the old record: that is what its next replay is.
        await self.db.execute(
            "INSERT INTO appservice_txn (txn_id, processed_at, digest) VALUES ($1, $2, $3) "
            "ON CONFLICT (txn_id) DO UPDATE SET processed_at=excluded.processed_at, "
            "digest=excluded.digest",
            txn_id,
            now,
            digest,
        )

    async def prune(self, older_than_ms: int | None = None) -> int:
        """Forget ids processed before older_than_ms (ms since the epoch; by default
        RETENTION_MS ago); how many went. The retention job (bridge.retention) calls it."""
        if older_than_ms is None:
            older_than_ms = now_ms() - self.RETENTION_MS
        rows = await self.db.fetch(
            "DELETE FROM appservice_txn WHERE processed_at < $1 RETURNING txn_id", older_than_ms
        )
        return len(rows)
