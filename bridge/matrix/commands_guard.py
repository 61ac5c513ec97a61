"""`guard ignore`: keep the encryption guard (bridge/onboarding/guard.py) out of a room."""

from __future__ import annotations

from mautrix.types import RoomID

from .commands import Command, CommandEvent

USAGE = "Usage: guard ignore [room ID] — without a room ID, this room."


async def guard_command(evt: CommandEvent) -> None:
    # Injected by app.py when onboarding.guard is not off.
    guard = evt.bot.guard
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


GUARD_COMMANDS = (
    Command(
        "guard",
        guard_command,
        "Keep the encryption guard out of a room: this one, or the one whose ID you give.",
        usage="ignore [room ID]",
    ),
)
