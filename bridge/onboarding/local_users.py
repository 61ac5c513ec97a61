"""The `local_user` table: whom the bot has greeted, in which DM, and what it last told them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mautrix.util.async_db import Database

from ..worker import now_ms


@dataclass
class LocalUser:
    user_id: str
    welcomed_at: int | None = None
    dm_room_id: str | None = None
    checkup_off: bool = False
    last_nudge_at: int | None = None
    known_devices: list[str] = field(default_factory=list)

    @classmethod
    def from_record(cls, record: Any) -> LocalUser:
        raw = record["known_devices"]
        return cls(
            user_id=record["user_id"],
            welcomed_at=record["welcomed_at"],
            dm_room_id=record["dm_room_id"],
            # SQLite hands booleans back as 0/1.
            checkup_off=bool(record["checkup_off"]),
            last_nudge_at=record["last_nudge_at"],
            # A JSON list: device IDs are opaque strings and may hold any separator.
            known_devices=json.loads(raw) if raw else [],
        )


class LocalUserStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, user_id: str) -> LocalUser | None:
        record = await self.db.fetchrow("SELECT * FROM local_user WHERE user_id=$1", user_id)
        return LocalUser.from_record(record) if record else None

    async def _ensure(self, user_id: str) -> None:
        await self.db.execute(
            "INSERT INTO local_user (user_id) VALUES ($1) ON CONFLICT (user_id) DO NOTHING",
            user_id,
        )

    async def set_dm(self, user_id: str, room_id: str) -> None:
        await self._ensure(user_id)
        await self.db.execute(
            "UPDATE local_user SET dm_room_id=$2 WHERE user_id=$1", user_id, room_id
        )

    async def set_welcomed(self, user_id: str, known_devices: list[str]) -> None:
        await self._ensure(user_id)
        await self.db.execute(
            "UPDATE local_user SET welcomed_at=$2, known_devices=$3 WHERE user_id=$1",
            user_id,
            now_ms(),
            json.dumps(sorted(known_devices)),
        )

    async def set_checkup_off(self, user_id: str, off: bool) -> None:
        await self._ensure(user_id)
        await self.db.execute(
            "UPDATE local_user SET checkup_off=$2 WHERE user_id=$1", user_id, off
        )

    async def set_devices(
        self, user_id: str, known_devices: list[str], last_nudge_at: int | None
    ) -> None:
        await self._ensure(user_id)
        await self.db.execute(
            "UPDATE local_user SET known_devices=$2, last_nudge_at=$3 WHERE user_id=$1",
            user_id,
            json.dumps(sorted(known_devices)),
            last_nudge_at,
        )
