"""The `checkup` command: the security checkup on demand, and the switch for reminders."""

from __future__ import annotations

from ..direct import room_is_direct_chat
from .commands import Command, CommandEvent

OFF_REPLY = (
    "Reminders are off: I won't write to you unasked any more. Send “checkup” whenever you want "
    "the report, “checkup on” to get reminders again."
)
ON_REPLY = (
    "Reminders are on: I'll tell you when a new session of yours appears without being "
    "verified (at most one message per {days})."
)


def _days(interval_ms: int) -> str:
    days = interval_ms / (24 * 3600 * 1000)
    if days == 1:
        return "day"
    return f"{days:g} days"


async def checkup_command(evt: CommandEvent) -> None:
    # Injected by the app (bridge.app); a Bot built without it has no checkup.
    onboarding = evt.bot.onboarding
    if onboarding is None:
        await evt.reply("The security checkup is not available on this bridge.")
        return
    arg = evt.args[0].lower() if evt.args else ""
    if arg == "off":
        await onboarding.set_reminders(evt.sender, on=False)
        await evt.reply(OFF_REPLY)
    elif arg == "on":
        await onboarding.set_reminders(evt.sender, on=True)
        await evt.reply(ON_REPLY.format(days=_days(onboarding.nudge_interval_ms)))
    elif arg:
        await evt.reply("Usage: checkup [on|off]")
    elif not await room_is_direct_chat(evt.bot.state_store, evt.room_id):
        # The report names the user's sessions: not for the other people in this room.
        await evt.reply("Ask me for a checkup in a direct chat with me: it lists your sessions.")
    else:
        await evt.reply(*await onboarding.run_checkup(evt.sender))


CHECKUP_COMMANDS = (
    Command(
        "checkup",
        checkup_command,
        "Check your encryption: cross-signing, unverified sessions, key backup. "
        "“checkup off” stops my unsolicited reminders, “checkup on” resumes them.",
        usage="[on|off]",
    ),
)
