"""Routing of Matrix events from appservice transactions. Routing only: work happens elsewhere."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from mautrix.errors import DecryptionError
from mautrix.types import (
    EncryptedEvent,
    Event,
    EventType,
    Membership,
    MessageEvent,
    RedactionEvent,
    RoomID,
    StateEvent,
    UserID,
)

from ..crypto import EncryptedSender
from ..identifiers import ghost_address, is_ghost
from ..onboarding.guard import GUARD_EVENTS, EncryptionGuard
from ..onboarding.welcome import Onboarding
from ..portal import PortalManager
from ..portal.outgoing import Outgoing
from ..portal.start import adopt_dm
from .bot import Bot


class RoomQueues:
    """Runs work for one room strictly in arrival order, and rooms in parallel.

    Transactions must be acknowledged quickly (a decryption may wait for keys that only a later
    transaction brings), so work is queued rather than awaited, without losing per-room order.
    """

    def __init__(self) -> None:
        self._tails: dict[RoomID, asyncio.Task[None]] = {}
        self.log = logging.getLogger("bridge.mx.queue")

    def submit(self, room_id: RoomID, work: Coroutine[Any, Any, None]) -> None:
        previous = self._tails.get(room_id)
        task = asyncio.create_task(self._run_after(previous, work))
        self._tails[room_id] = task

        def forget(t: asyncio.Task[None]) -> None:
            if self._tails.get(room_id) is t:
                del self._tails[room_id]

        task.add_done_callback(forget)

    async def _run_after(
        self, previous: asyncio.Task[None] | None, work: Coroutine[Any, Any, None]
    ) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        try:
            await work
        except Exception:
            self.log.exception("Unhandled error in room work")

    async def drain(self) -> None:
        while self._tails:
            await asyncio.wait(list(self._tails.values()))


class MatrixHandler:
    def __init__(
        self,
        bot: Bot,
        sender: EncryptedSender,
        hub: PortalManager,
        outgoing: Outgoing,
        username_template: str,
        domain: str,
    ) -> None:
        self.bot = bot
        self.sender = sender
        self.hub = hub
        self.outgoing = outgoing
        self.queues = RoomQueues()
        self._template = username_template
        self._domain = domain
        # Set by the app: greets local users the first time one of their events comes by.
        self.onboarding: Onboarding | None = None
        self.log = logging.getLogger("bridge.mx")

    def is_ours(self, user_id: UserID) -> bool:
        """The bot or one of our ghosts: never react to our own events."""
        return user_id == self.bot.mxid or is_ghost(self._template, user_id, self._domain)

    # The encryption guard (bridge/onboarding/guard.py): set by app.py when it is on.
    guard: EncryptionGuard | None = None

    async def _route_to_guard(self, evt: Event) -> None:
        """Room changes that may call for encryption, and `guard` commands said in plaintext in
        rooms the bot is not in (where it is, the bot answers them like any command)."""
        guard = self.guard
        sender = getattr(evt, "sender", None)  # typing and receipts have none
        if guard is None or not sender or self.is_ours(sender):
            return
        if evt.type in GUARD_EVENTS:
            if evt.type != EventType.ROOM_MEMBER or not self.is_ours(UserID(evt.state_key)):
                self.queues.submit(evt.room_id, guard.handle_event(evt))
        elif guard.is_room_command(evt) and not await self._bot_is_in(evt.room_id):
            self.queues.submit(evt.room_id, guard.handle_room_command(evt))

    async def dispatch(self, evt: Event) -> None:
        """Called in transaction order, after the state store has seen the event."""
        await self._route_to_guard(evt)
        sender = getattr(evt, "sender", None)  # typing and receipts have none
        if self.onboarding and sender and not evt.type.is_ephemeral and not self.is_ours(sender):
            await self.onboarding.seen(sender)
        if evt.type == EventType.ROOM_MEMBER:
            await self._route_member(evt)
        elif evt.type in (EventType.ROOM_MESSAGE, EventType.ROOM_ENCRYPTED):
            # With the guard's namespace the homeserver sends us every local user's rooms;
            # only those the bot is in are ours to read.
            if not self.is_ours(evt.sender) and await self._bot_is_in(evt.room_id):
                self.queues.submit(evt.room_id, self._handle_message(evt))
        elif evt.type == EventType.ROOM_REDACTION and not self.is_ours(evt.sender):
            self.queues.submit(evt.room_id, self._handle_redaction(evt))

    async def _bot_is_in(self, room_id: RoomID) -> bool:
        return await self.bot.state_store.is_joined(room_id, self.bot.mxid)

    async def _route_member(self, evt: StateEvent) -> None:
        # Synchronous: the next message in this transaction must be encrypted for the new
        # membership, so the outbound session is rotated before anything else happens.
        await self.sender.handle_member_event(evt)
        membership = evt.content.membership
        if evt.state_key == self.bot.mxid and membership == Membership.INVITE:
            if self.is_ours(evt.sender):
                return  # a portal being set up by one of our ghosts; the portal joins the bot
            self.queues.submit(evt.room_id, self.bot.handle_invite(evt))
        elif membership == Membership.INVITE and not self.is_ours(evt.sender):
            address = ghost_address(self._template, evt.state_key, self._domain)
            if address:
                self.queues.submit(evt.room_id, self._handle_ghost_invite(evt, address))
        elif evt.state_key != self.bot.mxid and membership in (Membership.LEAVE, Membership.BAN):
            self.queues.submit(evt.room_id, self.bot.handle_member_left(evt))

    async def _handle_message(self, evt: MessageEvent | EncryptedEvent) -> None:
        if isinstance(evt, EncryptedEvent):
            try:
                evt = await self.sender.decrypt(evt)
            except DecryptionError as e:
                self.log.getChild(evt.room_id).warning(
                    "Failed to decrypt %s from %s: %s", evt.event_id, evt.sender, e
                )
                await self.bot.tell_undecryptable(evt.room_id)
                return
        if evt.type != EventType.ROOM_MESSAGE:
            return
        portal = await self.hub.portal_for_room(evt.room_id)
        if portal:
            await self.outgoing.handle_message(portal, evt)
        else:
            await self.bot.handle_message(evt)

    async def _handle_redaction(self, evt: RedactionEvent) -> None:
        portal = await self.hub.portal_for_room(evt.room_id)
        if portal:
            await self.outgoing.handle_redaction(portal, evt)

    async def _handle_ghost_invite(self, evt: StateEvent, address: str) -> None:
        """A user invited one of our ghosts: that room becomes their DM portal with it."""
        if not self.bot.permissions.is_user(evt.sender):
            await self.hub.ghosts.reject_invite(address, evt.room_id)
            return
        try:
            await adopt_dm(self.hub, evt.sender, evt.room_id, address)
        except Exception:
            self.log.getChild(evt.room_id).exception("Failed to set up a DM with %s", address)
