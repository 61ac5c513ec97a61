"""The bridge bot: joins when invited, makes its rooms encrypted, and answers commands."""

from __future__ import annotations

import logging
import shlex

from mautrix.appservice import IntentAPI
from mautrix.client.state_store.asyncpg import PgStateStore
from mautrix.errors import IntentError, MForbidden
from mautrix.types import (
    EncryptionAlgorithm,
    EventID,
    EventType,
    Format,
    InReplyTo,
    Membership,
    MessageEvent,
    MessageType,
    RelatesTo,
    RelationType,
    RoomEncryptionStateEventContent,
    RoomID,
    StateEvent,
    TextMessageEventContent,
    UserID,
)

from ..crypto import CryptoAccount, EncryptedSender, PlaintextRefused
from ..direct import room_is_direct_chat
from ..permissions import Level, Permissions
from ..portal import PortalManager
from .commands import CORE_COMMANDS, CommandEvent, CommandRegistry
from .commands_checkup import CHECKUP_COMMANDS
from .commands_guard import GUARD_COMMANDS
from .protocols import CheckupService, RoomGuard

ENCRYPTION_OFF = (
    "I couldn't turn on encryption here because I don't have permission to change this room's "
    "settings, and I only talk in encrypted rooms. Please turn it on: Room settings → Security & "
    "Privacy → Encrypted."
)
UNDECRYPTABLE = (
    "⚠ I could not read your message{what}: your client did not send me its keys in time. "
    "Check that your session is verified, then send it again."
)
# The longest command text the bot reads (a `new` with a few dozen addresses fits easily).
MAX_COMMAND_CHARS = 4000
REFUSAL = (
    "Sorry, you are not allowed to use Cloakroom on this homeserver. "
    "If you think you should be, ask your homeserver admin."
)


def default_commands() -> CommandRegistry:
    """Every command the bot knows, registered here and nowhere else."""
    return CommandRegistry.of(*CORE_COMMANDS, *CHECKUP_COMMANDS, *GUARD_COMMANDS)


class Bot:
    def __init__(
        self,
        *,
        intent: IntentAPI,
        crypto: CryptoAccount,
        sender: EncryptedSender,
        state_store: PgStateStore,
        permissions: Permissions,
        command_prefix: str,
        homeserver_address: str,
        homeserver_domain: str,
        hub: PortalManager | None = None,
        commands: CommandRegistry | None = None,
        guard: RoomGuard | None = None,
        onboarding: CheckupService | None = None,
    ) -> None:
        self.hub = hub
        self.commands = commands if commands is not None else default_commands()
        # Injected by app.py (also set as attributes there); read by `guard` and `checkup`.
        self.guard = guard
        self.onboarding = onboarding
        self.intent = intent
        self.crypto = crypto
        self.sender = sender
        self.state_store = state_store
        self.permissions = permissions
        self.command_prefix = command_prefix
        self.homeserver_address = homeserver_address
        self.homeserver_domain = homeserver_domain
        self.mxid = intent.mxid
        self.log = logging.getLogger("bridge.mx.bot")

    async def notice(
        self, room_id: RoomID, text: str, html_text: str | None = None, *, plain_ok: bool = False
    ) -> None:
        content = TextMessageEventContent(msgtype=MessageType.NOTICE, body=text)
        if html_text:
            content.format = Format.HTML
            content.formatted_body = html_text
        try:
            await self.sender.send(self.intent, room_id, content, allow_plaintext=plain_ok)
        except PlaintextRefused:
            # The only thing said in the clear: that we only speak once the room is encrypted.
            await self.notice(room_id, ENCRYPTION_OFF, plain_ok=True)

    # Invites ---------------------------------------------------------------------------------

    async def handle_invite(self, evt: StateEvent) -> None:
        log = self.log.getChild(evt.room_id)
        if not self.permissions.is_user(evt.sender):
            log.info("Rejecting invite from %s: not permitted", evt.sender)
            await self.intent.leave_room(evt.room_id, reason=REFUSAL)
            return
        try:
            await self._handle_invite(evt)
        except Exception:
            log.exception("Failed to handle invite from %s", evt.sender)
            await self._tell_failure(evt.room_id)

    async def _handle_invite(self, evt: StateEvent) -> None:
        log = self.log.getChild(evt.room_id)
        await self.intent.join_room_by_id(evt.room_id)
        # Fills the state cache: members (for sharing keys), encryption and power levels.
        await self.intent.get_state(evt.room_id)
        log.info("Joined after an invite from %s", evt.sender)
        if not await self.state_store.is_encrypted(evt.room_id):
            await self._enable_encryption(evt.room_id)

    async def _enable_encryption(self, room_id: RoomID) -> None:
        content = RoomEncryptionStateEventContent(algorithm=EncryptionAlgorithm.MEGOLM_V1)
        try:
            await self.intent.send_state_event(room_id, EventType.ROOM_ENCRYPTION, content)
        except (MForbidden, IntentError) as e:
            # IntentError: mautrix checked the cached power levels before even trying.
            self.log.getChild(room_id).info("Cannot enable encryption: %s", e)
            await self.notice(room_id, ENCRYPTION_OFF, plain_ok=True)
            return
        # The state store learns from the transaction too, but we may send before it arrives.
        await self.state_store.set_encryption_info(room_id, content)
        self.log.getChild(room_id).info("Enabled encryption")

    async def handle_member_left(self, evt: StateEvent) -> None:
        """Leave rooms where nobody else is left: an empty DM is of no use to anyone."""
        try:
            joined = await self.state_store.get_members(evt.room_id, memberships=(Membership.JOIN,))
            if joined == [self.mxid]:
                self.log.getChild(evt.room_id).info("Everyone else left; leaving too")
                await self.intent.leave_room(evt.room_id)
        except Exception:
            self.log.getChild(evt.room_id).exception("Failed to leave an empty room")

    # Messages --------------------------------------------------------------------------------

    async def handle_message(self, evt: MessageEvent) -> None:
        if evt.content.msgtype != MessageType.TEXT:
            return  # notices are other bots; media are not commands
        relates_to = evt.content.relates_to
        if relates_to and relates_to.rel_type == RelationType.REPLACE:
            return  # an edit of an earlier message does not run its command again
        try:
            await self._handle_message(evt)
        except Exception:
            log = self.log.getChild(evt.room_id)
            log.exception("Failed to handle a message from %s", evt.sender)
            await self._tell_failure(evt.room_id)

    async def _tell_failure(self, room_id: RoomID) -> None:
        try:
            await self.notice(room_id, "Something went wrong on my side; the logs have details.")
        except Exception:
            self.log.getChild(room_id).exception("Could not report the failure")

    async def _handle_message(self, evt: MessageEvent) -> None:
        text = _strip_reply_fallback(evt.content.body).strip()
        if text.lower().startswith(self.command_prefix.lower()):
            text = text[len(self.command_prefix) :].strip()
        elif not await room_is_direct_chat(self.state_store, evt.room_id):
            return  # ordinary conversation in a shared room is not for us
        if not text:
            return
        level = self.permissions.level(evt.sender)
        if level < Level.USER:
            await self.notice(evt.room_id, REFUSAL)
            return
        if len(text) > MAX_COMMAND_CHARS:
            # No command needs more; don't tokenise a novel.
            await self.notice(evt.room_id, f"That is too long for a command (at most "
                                           f"{MAX_COMMAND_CHARS} characters). Send `help`.")
            return
        try:
            name, *args = shlex.split(text)
        except ValueError:
            name, *args = text.split()
        cmd = self.commands.get(name)
        if cmd is None or level < cmd.level:
            await self.notice(
                evt.room_id, f"Unknown command {name!r}. Send `help` to see what I can do."
            )
            return
        self.log.getChild(evt.room_id).debug("%s ran %s", evt.sender, cmd.name)
        await cmd.handler(CommandEvent(self, evt.room_id, evt.sender, level, cmd.name, args))

    async def tell_undecryptable(
        self, room_id: RoomID, sender: UserID, event_id: EventID | None = None, *,
        mailed: bool = False,
    ) -> None:
        """Say, replying to it, that a message could not be read (and so was not mailed)."""
        content = TextMessageEventContent(
            msgtype=MessageType.NOTICE,
            body=f"{sender}: " + UNDECRYPTABLE.format(what=", so it was not mailed" if mailed
                                                       else ""),
        )
        if event_id:
            content.relates_to = RelatesTo(in_reply_to=InReplyTo(event_id=event_id))
        try:
            await self.sender.send(self.intent, room_id, content)
        except PlaintextRefused:
            await self.notice(room_id, ENCRYPTION_OFF, plain_ok=True)


def _strip_reply_fallback(body: str) -> str:
    """Drop the quoted "> <@user> …" block older clients put in front of replies."""
    lines = body.splitlines()
    while lines and lines[0].startswith(">"):
        lines.pop(0)
    return "\n".join(lines)
