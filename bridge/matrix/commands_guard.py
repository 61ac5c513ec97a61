"""`guard ignore`: keep the encryption guard (bridge/onboarding/guard.py) out of a room."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mautrix.types import RoomID

from .commands import CommandEvent, command

if TYPE_CHECKING:
    from ..onboarding.guard import EncryptionGuard

USAGE = "Usage: guard ignore [room ID] — without a room ID, this room."


@command(
    "guard",
    "Keep the encryption guard out of a room: this one, or the one whose ID you give.",
    usage="ignore [room ID]",
)
async def guard_command(evt: CommandEvent) -> None:
    # app.py sets bot.guard when onboarding.guard is not off.
    guard: EncryptionGuard | None = getattr(evt.bot, "guard", None)
    if guard is None:
        await evt.reply("The encryption guard is off on this homeserver: it never acts anywhere.")
        return
    args = evt.args
    if not args or args[0].lower() != "ignore" or len(args) > 2:
        await evt.reply(USAGE)
        return
    room_id = RoomID(args[1]) if len(args) == 2 else evt.room_id
    # Naming another room (from the bot's DM) needs proof of membership; this room does not.
    answer = await guard.ignore(room_id, evt.sender, check_member=room_id != evt.room_id)
    await evt.reply(answer)
