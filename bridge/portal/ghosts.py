"""Ghosts: the Matrix users that stand for email addresses."""

from __future__ import annotations

import logging
from collections.abc import Callable

from mautrix.appservice import IntentAPI

from ..identifiers import ghost_mxid, is_ghost, normalize_address
from .store import GhostStore


def ghost_displayname(name: str, address: str) -> str:
    """``Bob Example (bob@example.com)``: the name people chose, and the address that proves it."""
    name = " ".join(name.split())
    return f"{name} ({address})" if name and name.lower() != address else address


class Ghosts:
    def __init__(
        self,
        *,
        intent_for: Callable[[str], IntentAPI],
        store: GhostStore,
        template: str,
        domain: str,
    ) -> None:
        self._intent_for = intent_for
        self.store = store
        self.template = template
        self.domain = domain
        self._registered: set[str] = set()
        self.log = logging.getLogger("bridge.portal.ghosts")

    def mxid(self, address: str) -> str:
        return ghost_mxid(self.template, address, self.domain)

    def owns(self, user_id: str) -> bool:
        return is_ghost(self.template, user_id, self.domain)

    async def leave(self, user_id: str, room_id: str) -> None:
        await self._intent_for(user_id).leave_room(room_id)

    async def reject_invite(self, address: str, room_id: str) -> None:
        intent = self._intent_for(self.mxid(normalize_address(address)))
        await intent.leave_room(room_id, reason="Only users of this bridge can start conversations")

    async def intent(self, address: str, name: str = "") -> IntentAPI:
        """The ghost's intent, registered and with an up-to-date display name."""
        address = normalize_address(address)
        mxid = self.mxid(address)
        intent = self._intent_for(mxid)
        if mxid not in self._registered:
            await intent.ensure_registered()
            self._registered.add(mxid)
        displayname = ghost_displayname(name, address)
        known = await self.store.displayname(mxid)
        # A later mail without a name must not erase a name we learnt earlier.
        if known is None or (name and known != displayname):
            await intent.set_displayname(displayname)
            await self.store.put(mxid, address, displayname)
        return intent
