"""Routing of Matrix events from appservice transactions. Routing only: work happens elsewhere.

Messages, encrypted messages and redactions in rooms the bot is in go to the durable inbox
(matrix.inbox) before the transaction is acknowledged; everything else (invites, leaves, the
encryption guard) is queued per room (matrix.queues). The guard, onboarding and the
`on_user_joined` hook are injected by app.py, typed by matrix.protocols: this edge imports no
other edge.
"""

from __future__ import annotations

import logging

from mautrix.types import (
    Event,
    EventID,
    EventType,
    Membership,
    MessageEvent,
    RedactionEvent,
    RoomID,
    StateEvent,
    UserID,
)
from mautrix.util.async_db import Database

from ..crypto import EncryptedSender
from ..identifiers import OurUsers, ghost_address
from ..portal import PortalManager
from ..portal.outgoing import Outgoing
from ..portal.start import adopt_dm
from .bot import Bot
from .inbox import DEFAULT_UNDECRYPTABLE_AFTER_SECONDS, Inbox, InboxStore
from .protocols import Greeter, RoomGuard, UserJoined
from .queues import RoomQueues

__all__ = ["MatrixHandler", "RoomQueues"]


class MatrixHandler:
    def __init__(
        self,
        bot: Bot,
        sender: EncryptedSender,
        hub: PortalManager,
        outgoing: Outgoing,
        username_template: str,
        domain: str,
        *,
        db: Database | None = None,
        undecryptable_after_seconds: float = DEFAULT_UNDECRYPTABLE_AFTER_SECONDS,
        guard: RoomGuard | None = None,
        onboarding: Greeter | None = None,
        on_user_joined: UserJoined | None = None,
    ) -> None:
        self.bot = bot
        self.sender = sender
        self.hub = hub
        self.outgoing = outgoing
        self.queues = RoomQueues()
        self._template = username_template
        self._ours = OurUsers(bot.mxid, username_template, domain)
        self._domain = domain
        # Injected by app.py (also settable as attributes, as app.py does today).
        self.guard = guard  # the encryption guard, None when off
        self.onboarding = onboarding  # greets local users the first time they come by
        self.on_user_joined = on_user_joined
        self.log = logging.getLogger("bridge.mx")
        self.inbox = Inbox(
            # The portal store's database is the bridge database (until app.py passes db).
            InboxStore(db if db is not None else hub.portals.db),
            self.queues,
            decrypt=lambda evt: sender.decrypt(evt, wait=0),
            handle=self._handle_event,
            tell_undecryptable=self._tell_undecryptable,
            wait_for_session=lambda room, session, timeout: sender.machine.wait_for_session(
                room, session, timeout=timeout
            ),
            undecryptable_after_seconds=undecryptable_after_seconds,
            request_key=sender.request_key,
        )

    async def start(self) -> None:
        """Resume the inbox rows an earlier run left (app.py: before transactions flow)."""
        await self.inbox.start()

    async def stop(self) -> None:
        await self.inbox.stop()

    def is_ours(self, user_id: UserID) -> bool:
        """The bot or one of our ghosts: never react to our own events."""
        return self._ours(user_id)

    async def dispatch(self, evt: Event) -> None:
        """Called in transaction order, after the state store has seen the event."""
        if not self.inbox.resumed:
            # Until app.py calls start(): before this process records its first row.
            await self.inbox.start()
        await self._route_to_guard(evt)
        sender = getattr(evt, "sender", None)  # typing and receipts have none
        if self.onboarding and sender and not evt.type.is_ephemeral and not self.is_ours(sender):
            await self.onboarding.seen(sender)
        if evt.type == EventType.ROOM_MEMBER:
            await self._route_member(evt)
        elif evt.type in (EventType.ROOM_MESSAGE, EventType.ROOM_ENCRYPTED,
                          EventType.ROOM_REDACTION):
            # With the guard's namespace the homeserver sends us every local user's rooms;
            # only those the bot is in are ours to read.
            if not self.is_ours(evt.sender) and await self._bot_is_in(evt.room_id):
                await self.inbox.record(evt)

    async def _route_to_guard(self, evt: Event) -> None:
        """Room changes that may call for encryption, and `guard` commands said in plaintext in
        rooms the bot is not in (where it is, the bot answers them like any command)."""
        guard = self.guard
        sender = getattr(evt, "sender", None)
        if guard is None or not sender or self.is_ours(sender):
            return
        if evt.type in guard.watched_events:
            if evt.type != EventType.ROOM_MEMBER or not self.is_ours(UserID(evt.state_key)):
                self.queues.submit(evt.room_id, guard.handle_event(evt))
        elif guard.is_room_command(evt) and not await self._bot_is_in(evt.room_id):
            self.queues.submit(evt.room_id, guard.handle_room_command(evt))

    async def _bot_is_in(self, room_id: RoomID) -> bool:
        return await self.bot.state_store.is_joined(room_id, self.bot.mxid)

    async def _route_member(self, evt: StateEvent) -> None:
        # Synchronous: the next message in this transaction must be encrypted for the new
        # membership, so the outbound session is rotated before anything else happens.
        await self.sender.handle_member_event(evt)
        membership = evt.content.membership
        target = UserID(evt.state_key)
        if target == self.bot.mxid and membership == Membership.INVITE:
            if self.is_ours(evt.sender):
                return  # a portal being set up by one of our ghosts; the portal joins the bot
            self.queues.submit(evt.room_id, self.bot.handle_invite(evt))
        elif membership == Membership.INVITE and not self.is_ours(evt.sender):
            address = ghost_address(self._template, target, self._domain)
            if address:
                self.queues.submit(evt.room_id, self._handle_ghost_invite(evt, address))
        elif membership == Membership.JOIN and not self.is_ours(target):
            # A real join, not a profile change (join → join).
            prev = evt.prev_content.membership if evt.prev_content else None
            if prev != Membership.JOIN and self.on_user_joined is not None and (
                await self._bot_is_in(evt.room_id)
            ):
                self.queues.submit(evt.room_id, self._tell_user_joined(target, evt.room_id))
        elif target != self.bot.mxid and membership in (Membership.LEAVE, Membership.BAN):
            if not self.is_ours(target):
                self.queues.submit(evt.room_id, self.hub.owner_left(evt.room_id, target))
            self.queues.submit(evt.room_id, self.bot.handle_member_left(evt))

    async def _tell_user_joined(self, user_id: UserID, room_id: RoomID) -> None:
        hook = self.on_user_joined
        if hook is None:
            return
        try:
            await hook(user_id, room_id)
        except Exception:
            self.log.getChild(room_id).exception("on_user_joined failed for %s", user_id)

    # Inbox rows, once decrypted ----------------------------------------------------------

    async def _handle_event(self, evt: Event) -> None:
        if isinstance(evt, RedactionEvent):
            await self._handle_redaction(evt)
        elif evt.type == EventType.ROOM_MESSAGE and isinstance(evt, MessageEvent):
            await self._handle_message(evt)
        # Anything else that was encrypted (reactions, custom events) is not for us.

    async def _handle_message(self, evt: MessageEvent) -> None:
        portal = await self.hub.portal_for_room(evt.room_id)
        if portal:
            await self.outgoing.handle_message(portal, evt)
        else:
            await self.bot.handle_message(evt)

    async def _tell_undecryptable(self, room_id: RoomID, sender: UserID, event_id: EventID
                                  ) -> None:
        portal = await self.hub.portal_for_room(room_id)
        await self.bot.tell_undecryptable(room_id, sender, event_id, mailed=portal is not None)

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
