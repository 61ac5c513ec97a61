"""The bridge's schema, one file per version. A fresh database jumps to the latest."""

from __future__ import annotations

import logging

from mautrix.util.async_db import UpgradeTable

upgrade_table = UpgradeTable(
    version_table_name="cloakroom_version",
    database_name="Cloakroom",
    log=logging.getLogger("bridge.db.upgrade"),
)

from . import (  # noqa: E402,F401,I001
    v01_initial,
    v02_email,
    v03_outbox,
    v04_onboarding,
    v05_hold,
    v06_matrix_inbox,
    v07_outbox,
    v08_at_rest,
    v09_inbound_seen,
    v10_txn_digest,
)
