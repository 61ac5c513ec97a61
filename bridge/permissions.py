"""Who may use the bridge: the `permissions` config section."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum


class Level(IntEnum):
    NONE = 0
    USER = 1
    ADMIN = 2


class Permissions:
    """Resolves a Matrix user ID to a level: exact MXID, then server name, then ``*``."""

    def __init__(self, rules: Mapping[str, str], homeserver_domain: str) -> None:
        # An empty section means "every local user may use the bridge": the zero-config default.
        self._rules = dict(rules) if rules else {homeserver_domain: "user"}

    def level(self, user_id: str) -> Level:
        _, _, server = user_id.partition(":")
        for key in (user_id, server, "*"):
            if key in self._rules:
                return Level[self._rules[key].upper()]
        return Level.NONE

    def is_user(self, user_id: str) -> bool:
        return self.level(user_id) >= Level.USER

    def is_admin(self, user_id: str) -> bool:
        return self.level(user_id) >= Level.ADMIN
