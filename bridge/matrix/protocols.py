"""What the Matrix edge needs from the services app.py injects into it.

Typed here so that matrix/ never imports another edge (onboarding/): app.py, the composition
root, hands in objects that have these shapes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from mautrix.types import Event, EventType, MessageEvent, RoomID, UserID

# Called when someone who is not ours joins a room the bot is in (the lead's held-mail release).
UserJoined = Callable[[UserID, RoomID], Awaitable[None]]


class RoomGuard(Protocol):
    """The encryption guard (onboarding.guard.EncryptionGuard)."""

    # The room events it wants to see (membership, join rules, encryption).
    watched_events: frozenset[EventType]

    async def handle_event(self, evt: Event) -> None: ...

    def is_room_command(self, evt: Event) -> bool: ...

    async def handle_room_command(self, evt: MessageEvent) -> None: ...

    async def ignore(self, room_id: RoomID, user_id: UserID, check_member: bool = True) -> str: ...


class Greeter(Protocol):
    """Onboarding as the handler sees it: told about every local user it comes across."""

    async def seen(self, user_id: UserID) -> None: ...


class CheckupService(Protocol):
    """Onboarding as the `checkup` command sees it."""

    nudge_interval_ms: int

    async def set_reminders(self, user_id: UserID, on: bool) -> None: ...

    async def run_checkup(self, user_id: UserID) -> tuple[str, str]: ...
