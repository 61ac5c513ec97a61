"""The bridge database on SQLite and PostgreSQL: schemas, our tables, and mautrix's crypto store."""

from __future__ import annotations

import time

import olm
import pytest
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.crypto import OlmAccount, PgCryptoStore
from mautrix.util.async_db import Database, UpgradeTable

from bridge.db import BridgeState, TxnLog, open_database, upgrade_table


@pytest.mark.parametrize(
    ("version_table", "upgrades"),
    [
        ("cloakroom_version", upgrade_table),
        ("mx_version", PgStateStore.upgrade_table),
        ("crypto_version", PgCryptoStore.upgrade_table),
    ],
    ids=["cloakroom", "mautrix-state", "mautrix-crypto"],
)
async def test_fresh_database_reaches_latest_versions(
    db: Database, version_table: str, upgrades: UpgradeTable
) -> None:
    assert len(upgrades.upgrades) > 0
    assert await db.fetchval(f"SELECT version FROM {version_table}") == len(upgrades.upgrades)


@pytest.mark.parametrize(
    "table", ["bridge_state", "appservice_txn", "mx_room_state", "crypto_account"]
)
async def test_fresh_database_has_tables(db: Database, table: str) -> None:
    assert await db.table_exists(table)


async def test_reopen_is_idempotent_and_keeps_data(db_url: str) -> None:
    db = await open_database(db_url)
    await BridgeState(db).set("k", "v")
    await TxnLog(db).mark("txn1")
    await db.stop()

    db = await open_database(db_url)
    try:
        assert await db.fetchval("SELECT version FROM cloakroom_version") == len(
            upgrade_table.upgrades
        )
        assert await db.fetchval("SELECT COUNT(*) FROM cloakroom_version") == 1
        assert await BridgeState(db).get("k") == "v"
        assert await TxnLog(db).seen("txn1")
    finally:
        await db.stop()


async def test_bridge_state_get_set_overwrite(db: Database) -> None:
    state = BridgeState(db)
    assert await state.get("missing") is None
    await state.set("key", "one")
    assert await state.get("key") == "one"
    await state.set("key", "two")
    assert await state.get("key") == "two"
    assert await state.get("missing") is None


async def test_txn_log_seen_mark(db: Database) -> None:
    log = TxnLog(db)
    assert not await log.seen("t1")
    await log.mark("t1")
    assert await log.seen("t1")
    await log.mark("t1")  # a replayed transaction is marked again without error
    assert await log.seen("t1")
    assert not await log.seen("t2")


async def test_txn_log_prune_drops_only_old_entries(db: Database) -> None:
    log = TxnLog(db)
    old = int(time.time() * 1000) - TxnLog.RETENTION_MS - 60_000
    await db.execute(
        "INSERT INTO appservice_txn (txn_id, processed_at) VALUES ($1, $2)", "old", old
    )
    await log.mark("new")
    assert await log.seen("old")
    assert await log.prune() == 1  # by default: older than RETENTION_MS
    assert not await log.seen("old")
    assert await log.seen("new")


async def test_txn_log_prune_takes_a_cutoff(db: Database) -> None:
    log = TxnLog(db)
    await log.mark("t1")
    assert await log.prune(int(time.time() * 1000) - 60_000) == 0
    assert await log.prune(int(time.time() * 1000) + 60_000) == 1
    assert not await log.seen("t1")


async def test_schema_v8_is_version_8_whatever_registers_before_it(db: Database) -> None:
    # v05–v07 are written in parallel; v08 pins its index so its number never moves.
    assert upgrade_table.upgrades[7].__mau_db_upgrade_description__.startswith(
        "Mail metadata sealed"
    )
    # Its columns exist (the inserts would fail otherwise).
    await db.execute(
        "INSERT INTO mail_message (room_id, message_id, event_id, thread_root, sealed) "
        "VALUES ('!r', 'm@x', '$e', '$e', 'v1:x')"
    )
    await db.execute(
        "INSERT INTO portal (id, owner, conv_key, kind, name, participants, sealed_subject) "
        "VALUES ('p', '@a:x', 'dm:b@x', 'dm', 'b', '[]', 'v1:x')"
    )


async def test_crypto_store_roundtrip_and_wrong_pickle_key(db: Database) -> None:
    account = OlmAccount()
    store = PgCryptoStore("@bot:example.org", "right key", db)
    await store.put_account(account)

    again = await PgCryptoStore("@bot:example.org", "right key", db).get_account()
    assert again is not None
    assert again.identity_keys == account.identity_keys

    # What the bridge reports as "encryption.pickle_key does not decrypt the keys in the database".
    with pytest.raises(olm.OlmAccountError):
        await PgCryptoStore("@bot:example.org", "wrong key", db).get_account()


async def test_crypto_store_accounts_stay_separate(db: Database) -> None:
    first, second = OlmAccount(), OlmAccount()
    await PgCryptoStore("@one:example.org", "key", db).put_account(first)
    await PgCryptoStore("@two:example.org", "key", db).put_account(second)

    got_first = await PgCryptoStore("@one:example.org", "key", db).get_account()
    got_second = await PgCryptoStore("@two:example.org", "key", db).get_account()
    assert got_first.identity_keys == first.identity_keys
    assert got_second.identity_keys == second.identity_keys
    assert got_first.identity_keys != got_second.identity_keys
    assert await PgCryptoStore("@three:example.org", "key", db).get_account() is None
