"""The one definition of a direct chat, for the bot's commands and the encryption guard.

A direct chat is a room with exactly two people in it, joined or invited: the two who talk.
Flags such as ``is_direct`` or a user's ``m.direct`` list are client hints that either side can
set or leave out, so they are not part of it. (A portal's kind ``"dm"`` — a conversation with
one email correspondent, whoever else is in its room — is a different idea.)

A leaf module (mautrix types only) beside identifiers.py: every layer may import it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from mautrix.types import Membership, RoomID, UserID

# The memberships that count someone as in the room.
PRESENT = (Membership.JOIN, Membership.INVITE)


class MemberSource(Protocol):
    async def get_members(
        self, room_id: RoomID, memberships: tuple[Membership, ...] = ...
    ) -> list[UserID]: ...


def is_direct_chat(present_members: Iterable[str]) -> bool:
    """Exactly two distinct people, joined or invited."""
    return len(set(present_members)) == 2


async def room_is_direct_chat(state: MemberSource, room_id: RoomID) -> bool:
    return is_direct_chat(await state.get_members(room_id, memberships=PRESENT))
