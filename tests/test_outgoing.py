"""The hub's Matrix → email side on a real database with a stand-in bot: where a message goes,
who it goes to, whom it is from, and what the user is told instead."""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import getaddresses
from typing import Any

import pytest
from mautrix.types import MessageEvent, RoomID
from mautrix.util.async_db import Database

from bridge.db import BridgeState
from bridge.portal.outbox import Outbox
from bridge.portal.outgoing import Outgoing, OutgoingSettings
from bridge.portal.store import MailMessageRow, MessageMap, PortalRow

ROOM = RoomID("!portal:hs")
OWNER = "@alice:hs"
BOB = "bob@example.org"


@dataclass
class FakeBot:
    mxid: str = "@cloakroom:hs"
    names: dict[str, str | None] = field(default_factory=dict)
    fail: bool = False
    asked: list[str] = field(default_factory=list)

    async def get_displayname(self, user_id: str) -> str | None:
        self.asked.append(user_id)
        if self.fail:
            raise ConnectionError("homeserver away")
        return self.names.get(user_id)


@dataclass
class World:
    outgoing: Outgoing
    outbox: Outbox
    messages: MessageMap
    bot: FakeBot
    db: Database
    notices: list[tuple[str, str | None]] = field(default_factory=list)
    counter: int = 0

    def portal(self, participants: list[str] | None = None, owner: str = OWNER,
               subject: str = "") -> PortalRow:
        return PortalRow(id="p1", owner=owner, conv_key=f"dm:{BOB}", kind="dm", room_id=ROOM,
                         name="Bob", participants=participants or [BOB], subject=subject)

    def event(self, body: str, sender: str = OWNER,
              relates: dict[str, Any] | None = None) -> MessageEvent:
        self.counter += 1
        content: dict[str, Any] = {"msgtype": "m.text", "body": body}
        if relates:
            content["m.relates_to"] = relates
        return MessageEvent.deserialize({
            "type": "m.room.message", "room_id": ROOM, "sender": sender,
            "event_id": f"$ev{self.counter}", "origin_server_ts": 1, "content": content,
        })

    async def say(self, body: str, portal: PortalRow | None = None, **kw: Any) -> MessageEvent:
        evt = self.event(body, sender=(portal or self.portal()).owner, **kw)
        await self.outgoing.handle_message(portal or self.portal(), evt)
        return evt

    async def mailed(self, evt: MessageEvent) -> EmailMessage | None:
        raw = await self.db.fetchval("SELECT raw FROM outbox WHERE event_id=$1", evt.event_id)
        if raw is None:
            return None
        (row,) = [r for r in await self.outbox.due(100) if r.event_id == evt.event_id]
        return email.message_from_bytes(row.raw, policy=email.policy.default)

    async def received(self, message_id: str, subject: str, reply_to: list[str] | None = None,
                       cc: list[str] | None = None, refs: list[str] | None = None) -> str:
        """A mail that came in (or went out) in the portal: its row in the message map."""
        self.counter += 1
        event_id = f"$in{self.counter}"
        await self.messages.put(MailMessageRow(
            room_id=ROOM, message_id=message_id, event_id=event_id, thread_root=event_id,
            subject=subject, reply_to=reply_to or [BOB], cc=cc or [], refs=refs or []))
        # Strictly later than anything before, whatever the clock's resolution.
        latest = await self.db.fetchval(
            "SELECT MAX(created_at) FROM mail_message WHERE message_id != $1", message_id
        )
        await self.db.execute(
            "UPDATE mail_message SET created_at=$1 WHERE message_id=$2", (latest or 0) + 1,
            message_id,
        )
        return event_id


@pytest.fixture
async def world(db: Database) -> World:
    outbox = Outbox(db, "test-pickle-key")
    messages = MessageMap(db)
    bot = FakeBot(names={OWNER: "Alice Liddell"})
    holder: dict[str, World] = {}

    async def notify(room_id: RoomID, text: str, reply_to: str | None) -> None:
        holder["w"].notices.append((text, reply_to))

    outgoing = Outgoing(
        bot=bot,  # type: ignore[arg-type]
        outbox=outbox,
        messages=messages,
        state=BridgeState(db),
        settings=OutgoingSettings(email_domain="mail.example", relay_configured=True,
                                  rate_limit=10, rate_window_ms=3_600_000, edits="notice",
                                  max_recipients=5),
        notify=notify,
        on_queued=lambda: None,
    )
    holder["w"] = World(outgoing, outbox, messages, bot, db)
    return holder["w"]


def _addresses(msg: EmailMessage, name: str) -> list[str]:
    return [a for _, a in getaddresses(msg.get_all(name) or [])]


# Issue 8 item 4: the main timeline continues the conversation -------------------------------


async def test_main_timeline_message_answers_the_latest_mail_of_the_room(world: World) -> None:
    await world.received("first@example.org", "Plans")
    await world.received("second@example.org", "Re: Plans", refs=["first@example.org"])
    msg = await world.mailed(await world.say("see you then"))
    assert msg is not None
    assert msg["Subject"] == "Re: Plans"
    assert msg["In-Reply-To"] == "<second@example.org>"
    assert msg["References"].split() == ["<first@example.org>", "<second@example.org>"]
    assert _addresses(msg, "To") == [BOB]
    assert world.notices == []


async def test_the_next_message_answers_our_own_latest_mail(world: World) -> None:
    await world.received("first@example.org", "Plans")
    first = await world.mailed(await world.say("one"))
    second = await world.mailed(await world.say("two"))
    assert first is not None and second is not None
    ours = first["Message-ID"]
    assert second["In-Reply-To"] == ours
    assert second["References"].split() == ["<first@example.org>", ours]
    assert second["Subject"] == "Re: Plans" and _addresses(second, "To") == [BOB]


async def test_without_any_mail_the_subject_is_the_new_command_s_or_a_default(
    world: World,
) -> None:
    msg = await world.mailed(await world.say("hello", portal=world.portal(subject="Kickoff")))
    assert msg is not None and msg["Subject"] == "Kickoff"
    assert msg["In-Reply-To"] is None and msg["References"] is None


async def test_an_element_reply_answers_the_mail_replied_to_not_the_latest(world: World) -> None:
    old = await world.received("first@example.org", "Plans")
    await world.received("other@example.org", "Something else")
    msg = await world.mailed(await world.say(
        "about the plans", relates={"m.in_reply_to": {"event_id": old}}))
    assert msg is not None
    assert msg["In-Reply-To"] == "<first@example.org>" and msg["Subject"] == "Re: Plans"


async def test_a_thread_reply_answers_the_latest_mail_of_its_thread(world: World) -> None:
    root = await world.received("first@example.org", "Plans")
    await world.received("other@example.org", "Something else")
    msg = await world.mailed(await world.say("in thread", relates={
        "rel_type": "m.thread", "event_id": root, "is_falling_back": True,
        "m.in_reply_to": {"event_id": root}}))
    assert msg is not None and msg["In-Reply-To"] == "<first@example.org>"


# Issue 9 item 4: nobody mails as someone else -------------------------------------------------


@pytest.mark.parametrize("owner", ["@alice+x:hs", "@Alice:hs", "@alice:elsewhere.example"])
async def test_users_without_a_mailbox_of_their_own_may_not_send(
    world: World, owner: str
) -> None:
    await world.received("first@example.org", "Plans")
    evt = await world.say("hi", portal=world.portal(owner=owner))
    assert await world.mailed(evt) is None
    ((text, reply_to),) = world.notices
    assert reply_to == evt.event_id
    assert text.startswith("Not emailed: you have no email address") and owner in text


async def test_from_is_the_owner_s_own_mailbox(world: World) -> None:
    await world.received("first@example.org", "Plans")
    msg = await world.mailed(await world.say("hi"))
    assert msg is not None and _addresses(msg, "From") == ["alice@mail.example"]


# Issue 9 item 5: no invisible recipients ------------------------------------------------------


async def test_too_many_reply_recipients_are_not_mailed_and_the_count_is_named(
    world: World,
) -> None:
    crowd = [f"person{n}@example.net" for n in range(8)]
    await world.received("first@example.org", "Plans", reply_to=crowd, cc=[BOB])
    evt = await world.say("reply to all?")
    assert await world.mailed(evt) is None
    ((text, _),) = world.notices
    assert "9 addresses" in text and "more than the 5" in text
    assert "person0@example.net" in text and "and 4 more" in text


async def test_a_reply_going_to_other_people_than_the_room_s_says_so_once(world: World) -> None:
    await world.received("first@example.org", "Plans", reply_to=["team@example.net"], cc=[BOB])
    first = await world.say("one")
    await world.say("two")
    msg = await world.mailed(first)
    assert msg is not None
    assert _addresses(msg, "To") == ["team@example.net"] and _addresses(msg, "Cc") == [BOB]
    ((text, reply_to),) = world.notices
    assert reply_to == first.event_id
    assert "This goes to: team@example.net, bob@example.org." in text
    assert "Not in this room: team@example.net" in text
    # A new set of recipients is a new notice.
    await world.received("third@example.org", "Re: Plans", reply_to=["carol@example.net"])
    await world.say("three")
    assert len(world.notices) == 2 and "This goes to: carol@example.net." in world.notices[1][0]
    assert "Not to: bob@example.org." in world.notices[1][0]


async def test_the_rate_limit_counts_recipients_not_mails(world: World) -> None:
    four = ["a@example.net", "b@example.net", "c@example.net", "d@example.net"]
    await world.received("first@example.org", "Plans", reply_to=[BOB], cc=four)
    assert await world.mailed(await world.say("to five")) is not None  # 5 of 10
    assert await world.mailed(await world.say("to five again")) is not None  # 10 of 10
    over = await world.say("one too many")
    assert await world.mailed(over) is None
    text = world.notices[-1][0]
    assert "sent mail to 10 recipients recently (this one would add 5)" in text
    assert "the limit is 10 per hour" in text and "Sending resumes at" in text


async def test_a_mail_with_more_recipients_than_the_rate_allows_says_it_never_can(
    world: World,
) -> None:
    world.outgoing.settings.rate_limit = 3
    await world.received("first@example.org", "Plans", reply_to=[BOB],
                         cc=["a@example.net", "b@example.net", "c@example.net"])
    assert await world.mailed(await world.say("to four")) is None
    assert "would go to 4 addresses, and you may send to at most 3 per hour" in (
        world.notices[-1][0])


# Issue 13 item 6: From in the user's current name ---------------------------------------------


async def test_from_name_is_the_current_global_display_name(world: World) -> None:
    await world.received("first@example.org", "Plans")
    msg = await world.mailed(await world.say("one"))
    assert msg is not None and msg["From"].addresses[0].display_name == "Alice Liddell"
    world.bot.names[OWNER] = "Alice Pleasance"
    msg = await world.mailed(await world.say("two"))
    assert msg is not None and msg["From"].addresses[0].display_name == "Alice Pleasance"


@pytest.mark.parametrize("trouble", ["none", "blank", "error"])
async def test_from_name_falls_back_to_the_localpart(world: World, trouble: str) -> None:
    await world.received("first@example.org", "Plans")
    world.bot.names[OWNER] = {"none": None, "blank": "  ", "error": "x"}[trouble]
    world.bot.fail = trouble == "error"
    msg = await world.mailed(await world.say("hi"))
    assert msg is not None and msg["From"].addresses[0].display_name == "alice"
