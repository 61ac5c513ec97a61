"""The encryption guard: local users' private rooms get end-to-end encryption switched on.

`onboarding.guard` is ``private`` (every room whose join rule is not ``public``), ``dm`` (only
direct chats) or ``off``. The guard needs the registration's non-exclusive namespace for local
users: through it the homeserver tells us about their rooms and lets the appservice act as them.

The guard looks at a room when a local user it serves joins it, invites someone or changes its
join rules, and decides it once (table ``guard_seen_room``). A room is left alone when it is
public, a space, already encrypted, ignored (``guard ignore`` or ``onboarding.guard_ignore_rooms``)
or, in ``dm`` mode, not a DM; of these only "public" (on a change of join rules), "not a DM" and
"nobody may" are looked at again. Otherwise the guard posts one short plaintext notice and then
sends ``m.room.encryption`` as the local user (who has the power in rooms they created), else as
the room's creator if the guard serves them, else as the bot when it is a member with enough
power. When none of them may, it does nothing at all, notice included.

What counts as a DM (``dm`` mode) is the bridge's one definition of a direct chat
(bridge.direct): exactly two members, joined or invited.

Blast radius. The namespace lets the appservice act as *any* local user, so the guard narrows
whom it acts for and where:

* only people: a local user the permissions allow who has logged in with a device of their own
  (a device the homeserver has seen in use — ``last_seen_ts`` in ``GET /devices``). Users of
  other appservices (bridge puppets, bots) have no such device, nor do accounts nobody ever
  logged into; the guard never acts as them;
* only in rooms of people: a room created by a local user who is not a person in that sense is
  left alone, whoever joins it (another bridge's portal is that bridge's business);
* only with consent: it acts as a user only once they have *joined* the room themselves; an
  invite makes it look at a room only when the inviter created that room (their own room), so a
  stranger's invite into someone else's room triggers nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from mautrix.api import Method, Path
from mautrix.appservice import IntentAPI
from mautrix.errors import IntentError, MatrixRequestError, MForbidden, MNotFound
from mautrix.types import (
    EncryptionAlgorithm,
    Event,
    EventType,
    Format,
    JoinRule,
    Membership,
    MessageEvent,
    MessageType,
    PowerLevelStateEventContent,
    RoomEncryptionStateEventContent,
    RoomID,
    RoomType,
    StateEvent,
    TextMessageEventContent,
    UserID,
)
from mautrix.util.async_db import Database

from ..config import Config
from ..direct import is_direct_chat
from ..permissions import Permissions
from ..worker import now_ms

# The events the handler passes to EncryptionGuard.handle_event. Not m.room.create: it arrives
# before its creator has even joined; the join and the join rules that follow are what count.
GUARD_EVENTS = frozenset(
    {EventType.ROOM_MEMBER, EventType.ROOM_JOIN_RULES, EventType.ROOM_ENCRYPTION}
)
MODES = ("private", "dm", "off")

# Outcomes in guard_seen_room. Final ones are never looked at again.
ENCRYPTED = "encrypted"  # the guard turned encryption on
ALREADY_ENCRYPTED = "already_encrypted"
SPACE = "space"
FINAL = frozenset({ENCRYPTED, ALREADY_ENCRYPTED, SPACE})
# Pending: looked at again when an event could have changed the answer.
PUBLIC = "public"  # again when the join rule changes to something else
NOT_DM = "not_dm"  # mode dm: again on the next membership change
NO_POWER = "no_power"  # neither the user nor the bot may send m.room.encryption
NOTIFIED = "notified"  # the notice is out but encryption is not confirmed: retry, silently
NOT_A_PERSON = "not_a_person"  # created by an appservice user or a never-used account

Notify = Callable[[RoomID, str, str], Awaitable[None]]
IsPerson = Callable[[UserID], Awaitable[bool]]
# An answer "not a person" is asked again after this long (they may log in for the first time).
NOT_A_PERSON_TTL_MS = 10 * 60 * 1000




class GuardStore:
    """guard_seen_room (what was decided per room) and guard_ignored_room (opt-outs)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def outcome(self, room_id: RoomID) -> str | None:
        return await self.db.fetchval(
            "SELECT outcome FROM guard_seen_room WHERE room_id=$1", room_id
        )

    async def record(self, room_id: RoomID, outcome: str) -> None:
        await self.db.execute(
            "INSERT INTO guard_seen_room (room_id, outcome, seen_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (room_id) DO UPDATE "
            "SET outcome=excluded.outcome, seen_at=excluded.seen_at",
            room_id, outcome, now_ms(),
        )

    async def is_ignored(self, room_id: RoomID) -> bool:
        found = await self.db.fetchval(
            "SELECT 1 FROM guard_ignored_room WHERE room_id=$1", room_id
        )
        return found is not None

    async def ignore(self, room_id: RoomID, user_id: UserID) -> None:
        await self.db.execute(
            "INSERT INTO guard_ignored_room (room_id, ignored_by, ignored_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (room_id) DO NOTHING",
            room_id, user_id, now_ms(),
        )


@dataclass
class RoomFacts:
    """What the guard needs to know about a room, from one /state request."""

    # None: the room is still being created. Synapse persists power levels, join rules and the
    # creator's initial state (encryption included) as one batch, so with join rules present
    # we see the room as its creator meant it.
    join_rule: JoinRule | None = None
    encrypted: bool = False
    room_type: RoomType | None = None
    create: StateEvent | None = None
    power_levels: PowerLevelStateEventContent | None = None
    members: list[UserID] = field(default_factory=list)  # joined or invited
    joined: list[UserID] = field(default_factory=list)

    @classmethod
    def parse(cls, state: Iterable[StateEvent]) -> RoomFacts:
        facts = cls()
        for evt in state:
            if evt.type == EventType.ROOM_JOIN_RULES:
                facts.join_rule = evt.content.join_rule
            elif evt.type == EventType.ROOM_ENCRYPTION:
                facts.encrypted = bool(evt.content.algorithm)
            elif evt.type == EventType.ROOM_CREATE:
                facts.create = evt
                facts.room_type = evt.content.type
            elif evt.type == EventType.ROOM_POWER_LEVELS:
                facts.power_levels = evt.content
            elif evt.type == EventType.ROOM_MEMBER and evt.content.membership in (
                Membership.JOIN, Membership.INVITE
            ):
                facts.members.append(UserID(evt.state_key))
                if evt.content.membership == Membership.JOIN:
                    facts.joined.append(UserID(evt.state_key))
        return facts

    def may_enable(self, user_id: UserID) -> bool:
        levels = self.power_levels or PowerLevelStateEventContent()
        needed = levels.get_event_level(EventType.ROOM_ENCRYPTION)
        return levels.get_user_level(user_id, self.create) >= needed

    @property
    def creator(self) -> UserID | None:
        return self.create.sender if self.create else None


class OwnDevices:
    """Whether a local user is a person who logged in: a device the homeserver has seen in use.

    Asked as the user (``GET /devices`` through the appservice). Appservice users get devices
    only through MSC4190, and the homeserver records no use of those (Synapse keeps no client
    IPs for appservice requests unless ``track_appservice_user_ips`` is on), so
    ``last_seen_ts`` tells them apart. A "yes" is kept; a "no" is asked again later.
    """

    def __init__(self, intent_for: Callable[[UserID], IntentAPI]) -> None:
        self.intent_for = intent_for
        self._people: set[UserID] = set()
        self._not_people: dict[UserID, int] = {}
        self.log = logging.getLogger("bridge.guard.devices")

    async def __call__(self, user_id: UserID) -> bool:
        if user_id in self._people:
            return True
        checked = self._not_people.get(user_id)
        if checked is not None and now_ms() - checked < NOT_A_PERSON_TTL_MS:
            return False
        try:
            answer = await self.intent_for(user_id).api.request(Method.GET, Path.v3.devices)
        except (MatrixRequestError, OSError) as e:
            self.log.info("Cannot list the devices of %s (%s): not acting for them", user_id, e)
            return False
        devices = answer.get("devices") or []
        if any(d.get("last_seen_ts") for d in devices if isinstance(d, dict)):
            self._people.add(user_id)
            return True
        self._not_people[user_id] = now_ms()
        return False


class EncryptionGuard:
    # The events it wants from the handler (matrix.protocols.RoomGuard).
    watched_events = GUARD_EVENTS

    def __init__(
        self,
        *,
        mode: str,
        intent_for: Callable[[UserID], IntentAPI],
        bot: IntentAPI,
        permissions: Permissions,
        db: Database,
        ignore_rooms: Iterable[str] = (),
        notify: Notify,
        command_prefix: str = "!cloakroom",
        is_person: IsPerson | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown guard mode {mode!r}")
        self.mode = mode
        self.intent_for = intent_for
        self.bot = bot
        self.permissions = permissions
        self.store = GuardStore(db)
        self.ignore_rooms = frozenset(ignore_rooms)
        self.notify = notify
        self.command_prefix = command_prefix
        self.is_person = is_person or OwnDevices(intent_for)
        self._domain_suffix = ":" + bot.mxid.partition(":")[2]
        self.log = logging.getLogger("bridge.guard")

    def _serves(self, user_id: str | None) -> bool:
        """A local user the permissions allow: the appservice can only act as local users."""
        return bool(user_id) and user_id.endswith(self._domain_suffix) and (
            user_id != self.bot.mxid and self.permissions.is_user(user_id)
        )

    async def _may_act_for(self, user_id: str | None) -> bool:
        """Served, and a person with a device of their own (not another appservice's user)."""
        return self._serves(user_id) and await self.is_person(UserID(user_id))

    def _is_local(self, user_id: str | None) -> bool:
        return bool(user_id) and user_id.endswith(self._domain_suffix)

    # Room events -------------------------------------------------------------------------

    async def handle_event(self, evt: Event) -> None:
        """m.room.member, m.room.join_rules and m.room.encryption events (GUARD_EVENTS)."""
        if self.mode == "off" or evt.type not in GUARD_EVENTS:
            return
        try:
            await self._handle_event(evt)
        except Exception:
            self.log.exception("Failed to look after %s (%s)", evt.room_id, evt.type)

    async def _handle_event(self, evt: StateEvent) -> None:
        room_id = evt.room_id
        previous = await self.store.outcome(room_id)
        if previous in FINAL:
            return
        if evt.type == EventType.ROOM_ENCRYPTION:
            # Encrypted by someone: nothing left to do here, ever (it cannot be turned off).
            await self.store.record(room_id, ALREADY_ENCRYPTED)
            return
        actor = _actor(evt)
        if previous == PUBLIC and not _may_have_gone_private(evt):
            return  # only a change of join rule can make a public room private
        if not await self._may_act_for(actor):
            return
        if await self._ignored(room_id):
            return
        await self._decide(room_id, UserID(actor), previous, by_invite=_is_invite(evt))

    async def _ignored(self, room_id: RoomID) -> bool:
        return room_id in self.ignore_rooms or await self.store.is_ignored(room_id)

    async def _decide(
        self, room_id: RoomID, actor: UserID, previous: str | None, by_invite: bool = False
    ) -> None:
        log = self.log.getChild(room_id)
        facts = await self._read_room(room_id, actor)
        if facts is None:
            return
        if facts.join_rule is None:
            log.debug("Still being created; deciding on a later event")
            return
        skip = await self._reason_to_skip(room_id, facts)
        if skip:
            if previous != NOTIFIED or skip in FINAL:  # keep a notified room due for a retry
                await self.store.record(room_id, skip)
            log.debug("Left alone (%s)", skip)
            return
        if actor not in facts.joined or (by_invite and facts.creator != actor):
            # Consent: only a member acts, and an invite counts only in the inviter's own room.
            log.debug("%s has not joined, or invited into a room not theirs: nothing", actor)
            return
        enabler = self._pick_enabler(facts, actor)
        if enabler is None:
            if previous != NOTIFIED:  # a notice already out keeps its room due for a retry
                await self.store.record(room_id, NO_POWER)
            log.info("Not encrypted, but neither %s nor the bot may turn encryption on", actor)
            return
        if previous != NOTIFIED:
            # Before the encryption event, so everybody's client can still read it.
            await self._post_notice(room_id, enabler, self.bot.mxid in facts.joined)
            await self.store.record(room_id, NOTIFIED)
        if await self._enable(room_id, enabler):
            await self.store.record(room_id, ENCRYPTED)
            log.info("Turned encryption on as %s (for %s)", enabler.mxid, actor)

    async def _read_room(self, room_id: RoomID, actor: UserID) -> RoomFacts | None:
        """The room as the user sees it (the bot is usually not in it); None if they cannot."""
        user = self.intent_for(actor)
        # ensure_joined=False everywhere, or mautrix would make the user join a room they left.
        try:
            try:
                rules = await user.get_state_event(
                    room_id, EventType.ROOM_JOIN_RULES, ensure_joined=False
                )
            except MNotFound:
                return RoomFacts()  # still being created
            if rules.join_rule == JoinRule.PUBLIC:
                # Decided without the full state, which can be huge in a public room.
                return RoomFacts(join_rule=JoinRule.PUBLIC)
            return RoomFacts.parse(await user.get_state(room_id, ensure_joined=False))
        except MForbidden as e:
            self.log.getChild(room_id).debug("Cannot read the room as %s: %s", actor, e)
            return None

    def _pick_enabler(self, facts: RoomFacts, actor: UserID) -> IntentAPI | None:
        """Who sends m.room.encryption: the user, else the room's creator when we serve them
        too, else the bot when it is in the room; always someone whose power suffices."""
        for user_id in (actor, facts.creator):
            # The creator, if local, passed the person check in _reason_to_skip.
            if self._serves(user_id) and user_id in facts.joined and facts.may_enable(user_id):
                return self.intent_for(user_id)
        if self.bot.mxid in facts.joined and facts.may_enable(self.bot.mxid):
            return self.bot
        return None

    async def _reason_to_skip(self, room_id: RoomID, facts: RoomFacts) -> str | None:
        if facts.encrypted:
            return ALREADY_ENCRYPTED
        if facts.room_type == RoomType.SPACE:
            return SPACE  # a space has no messages to protect
        if facts.join_rule == JoinRule.PUBLIC:
            return PUBLIC
        creator = facts.creator
        if self._is_local(creator) and creator != self.bot.mxid and not await self.is_person(
            UserID(creator)
        ):
            # An appservice's user (another bridge's portal) or a never-used account made it.
            return NOT_A_PERSON
        if self.mode == "dm" and not is_direct_chat(facts.members):
            return NOT_DM
        return None

    async def _post_notice(self, room_id: RoomID, enabler: IntentAPI, bot_joined: bool) -> None:
        """From the bot where it is in the room; else in the name of the user who turns
        encryption on (the appservice has no device of theirs: plaintext is all it can send)."""
        text, html_text = self.notice_text()
        if bot_joined:
            await self.notify(room_id, text, html_text)
            return
        content = TextMessageEventContent(
            msgtype=MessageType.NOTICE, body=text, format=Format.HTML, formatted_body=html_text
        )
        # The same transaction id on a retry after a crash: the homeserver posts it only once.
        await enabler.send_message_event(
            room_id, EventType.ROOM_MESSAGE, content, txn_id=f"cloakroom-guard-{room_id}",
            ensure_joined=False,
        )

    def notice_text(self) -> tuple[str, str]:
        prefix = self.command_prefix
        text = (
            "Cloakroom (on behalf of your homeserver): this room is private but was not "
            "end-to-end encrypted, so encryption is being turned on now. It cannot be turned off "
            "again. To keep Cloakroom out of a room before it acts, say "
            f"`{prefix} guard ignore` in that room, or send `guard ignore <room ID>` to "
            f"{self.bot.mxid} in a direct chat; your admin can also list the room ID in "
            "onboarding.guard_ignore_rooms."
        )
        html_text = (
            "<b>Cloakroom</b> (on behalf of your homeserver): this room is private but was not "
            "end-to-end encrypted, so encryption is being turned on now. It cannot be turned off "
            "again. To keep Cloakroom out of a room before it acts, say "
            f"<code>{prefix} guard ignore</code> in that room, or send "
            f"<code>guard ignore &lt;room ID&gt;</code> to {self.bot.mxid} in a direct chat; "
            "your admin can also list the room ID in <code>onboarding.guard_ignore_rooms</code>."
        )
        return text, html_text

    async def _enable(self, room_id: RoomID, intent: IntentAPI) -> bool:
        content = RoomEncryptionStateEventContent(algorithm=EncryptionAlgorithm.MEGOLM_V1)
        try:
            await intent.send_state_event(
                room_id, EventType.ROOM_ENCRYPTION, content, ensure_joined=False
            )
        except (IntentError, MatrixRequestError) as e:
            # Power levels changed since we looked, or the homeserver failed: the room stays
            # "notified", so the next event retries without a second notice.
            self.log.getChild(room_id).warning("Could not turn encryption on: %s", e)
            return False
        # The state store learns from the transaction too, but the bot may speak before that.
        await intent.state_store.set_encryption_info(room_id, content)
        return True

    # Opting out ----------------------------------------------------------------------------

    def is_room_command(self, evt: Event) -> bool:
        """`<prefix> guard …` said in plaintext, in a room the bot is not in."""
        if self.mode == "off" or evt.type != EventType.ROOM_MESSAGE:
            return False
        body = getattr(evt.content, "body", None)
        if getattr(evt.content, "msgtype", None) != MessageType.TEXT or not isinstance(body, str):
            return False
        words = body.strip().split()
        return len(words) >= 2 and [w.lower() for w in words[:2]] == [
            self.command_prefix.lower(), "guard"
        ]

    async def handle_room_command(self, evt: MessageEvent) -> None:
        if not await self._may_act_for(evt.sender):
            return  # we may not speak for them, and the bot is not here to answer
        try:
            args = evt.content.body.split()[2:]
            if [a.lower() for a in args] == ["ignore"]:
                answer = await self.ignore(evt.room_id, evt.sender, check_member=False)
            else:
                answer = f"Usage: {self.command_prefix} guard ignore"
            await self._answer_as(evt.sender, evt.room_id, answer)
        except Exception:
            self.log.exception("Failed to handle a guard command in %s", evt.room_id)

    async def _answer_as(self, user_id: UserID, room_id: RoomID, answer: str) -> None:
        # Said in the user's name (the bot is not in the room) and in plaintext, so only in a
        # room that is still unencrypted: the command itself arrived in plaintext.
        if await self.bot.state_store.is_encrypted(room_id):
            return
        content = TextMessageEventContent(
            msgtype=MessageType.NOTICE, body=f"Cloakroom (on behalf of your homeserver): {answer}"
        )
        await self.intent_for(user_id).send_message_event(
            room_id, EventType.ROOM_MESSAGE, content, ensure_joined=False
        )

    async def ignore(self, room_id: RoomID, user_id: UserID, check_member: bool = True) -> str:
        """Record an opt-out by a member of the room; returns the answer for them."""
        if self.mode == "off":
            return "The encryption guard is off on this homeserver: it never acts anywhere."
        if not room_id.startswith("!"):
            return f"{room_id!r} is not a room ID (they start with '!')."
        if check_member and not await self._is_member(room_id, user_id):
            return f"You are not a member of {room_id}, so you cannot opt it out."
        await self.store.ignore(room_id, user_id)
        self.log.info("%s asked the guard to leave %s alone", user_id, room_id)
        if await self.store.outcome(room_id) in (ENCRYPTED, NOTIFIED):
            return (
                f"Noted: the guard will not act in {room_id} again. It already turned "
                "encryption on there, and that cannot be undone."
            )
        return f"Done: the encryption guard will leave {room_id} alone."

    async def _is_member(self, room_id: RoomID, user_id: UserID) -> bool:
        if not self._serves(user_id):
            return False
        try:
            member = await self.intent_for(user_id).get_state_event(
                room_id, EventType.ROOM_MEMBER, user_id, ensure_joined=False
            )
        except (MForbidden, MNotFound):
            return False
        return member.membership == Membership.JOIN


def _actor(evt: StateEvent) -> str | None:
    """The local user on whose behalf the guard looks at the room after this event."""
    if evt.type != EventType.ROOM_MEMBER:
        return evt.sender
    if evt.content.membership == Membership.JOIN:
        return evt.state_key
    if evt.content.membership == Membership.INVITE:
        return evt.sender  # in mode dm, the invite is what makes a room a DM
    return None


def _is_invite(evt: StateEvent) -> bool:
    return evt.type == EventType.ROOM_MEMBER and evt.content.membership == Membership.INVITE


def _may_have_gone_private(evt: StateEvent) -> bool:
    return evt.type == EventType.ROOM_JOIN_RULES and evt.content.join_rule != JoinRule.PUBLIC


def build_guard(
    config: Config, intent: IntentAPI, permissions: Permissions, db: Database, notify: Notify,
    command_prefix: str,
) -> EncryptionGuard | None:
    """The guard as configured, or None when onboarding.guard is off."""
    if config["onboarding.guard"] == "off":
        return None
    return EncryptionGuard(
        mode=config["onboarding.guard"],
        intent_for=intent.user,
        bot=intent,
        permissions=permissions,
        db=db,
        ignore_rooms=config["onboarding.guard_ignore_rooms"] or (),
        notify=notify,
        command_prefix=command_prefix,
    )
