"""Bot commands: small functions with their own help text.

Each command module lists its commands in a tuple (``CORE_COMMANDS`` here); the bot builds its
registry from those tuples explicitly (matrix.bot.default_commands). Importing a module
registers nothing.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from email_validator import EmailNotValidError, validate_email
from mautrix.types import RoomID, UserID

from .. import __version__
from ..permissions import Level
from ..portal.portal import MAX_SEATED
from ..portal.start import start_conversation

if TYPE_CHECKING:
    from .bot import Bot


@dataclass
class CommandEvent:
    bot: Bot
    room_id: RoomID
    sender: UserID
    level: Level
    name: str
    args: list[str]

    async def reply(self, text: str, html_text: str | None = None) -> None:
        await self.bot.notice(self.room_id, text, html_text)


Handler = Callable[[CommandEvent], Awaitable[None]]


@dataclass
class Command:
    name: str
    handler: Handler
    help: str
    usage: str = ""
    level: Level = Level.USER


@dataclass
class CommandRegistry:
    commands: dict[str, Command] = field(default_factory=dict)

    @classmethod
    def of(cls, *commands: Command) -> CommandRegistry:
        registry = cls()
        for cmd in commands:
            registry.add(cmd)
        return registry

    def add(self, cmd: Command) -> None:
        if cmd.name in self.commands:
            raise ValueError(f"command {cmd.name!r} registered twice")
        self.commands[cmd.name] = cmd

    def get(self, name: str) -> Command | None:
        return self.commands.get(name.lower())


async def help_command(evt: CommandEvent) -> None:
    lines = []
    html_lines = []
    for cmd in evt.bot.commands.commands.values():
        if evt.level < cmd.level:
            continue
        usage = f"{cmd.name} {cmd.usage}".strip()
        lines.append(f"• {usage} — {cmd.help}")
        html_lines.append(f"<li><code>{html.escape(usage)}</code> — {html.escape(cmd.help)}</li>")
    prefix = evt.bot.command_prefix
    tail = f"In rooms with other people, start commands with {prefix}."
    await evt.reply(
        "Cloakroom commands:\n" + "\n".join(lines) + f"\n{tail}",
        f"<p>Cloakroom commands:</p><ul>{''.join(html_lines)}</ul>"
        f"<p>In rooms with other people, start commands with <code>{html.escape(prefix)}</code>."
        "</p>",
    )


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


async def status_command(evt: CommandEvent) -> None:
    bot = evt.bot
    cross_signed = await bot.crypto.is_cross_signed_on_server()
    encrypted = await bot.sender.is_encrypted(bot.intent, evt.room_id)
    rows = [
        ("Version", f"Cloakroom {__version__}"),
        ("Homeserver", f"{bot.homeserver_domain} ({bot.homeserver_address})"),
        ("Bot device", bot.crypto.device_id),
        ("Device cross-signed by the bot", _yes_no(cross_signed)),
        ("This room is encrypted", _yes_no(encrypted)),
    ]
    await evt.reply(
        "\n".join(f"{k}: {v}" for k, v in rows),
        "<ul>"
        + "".join(f"<li>{html.escape(k)}: <b>{html.escape(str(v))}</b></li>" for k, v in rows)
        + "</ul>",
    )


def parse_new(args: list[str]) -> tuple[list[str], str]:
    """``a@x, b@y Subject words`` → (["a@x", "b@y"], "Subject words")."""
    addresses: list[str] = []
    rest = list(args)
    while rest:
        token = rest.pop(0)
        parts = [p for p in token.split(",") if p]
        addresses.extend(parts)
        # The list goes on while a token ends with a comma or the next one starts with one.
        if not token.endswith(",") and not (rest and rest[0].startswith(",")):
            break
    return addresses, " ".join(rest).strip()


async def new_command(evt: CommandEvent) -> None:
    addresses, subject = parse_new(evt.args)
    if not addresses:
        await evt.reply("Usage: new <address>[, <address>…] <subject>")
        return
    if len(addresses) > MAX_SEATED:
        # Each address becomes a Matrix user with its own device in the room.
        await evt.reply(f"At most {MAX_SEATED} addresses in one conversation; you gave "
                        f"{len(addresses)}.")
        return
    valid = []
    for address in addresses:
        try:
            valid.append(validate_email(address, check_deliverability=False).normalized)
        except EmailNotValidError as e:
            await evt.reply(f"{address!r} is not a valid email address: {e}")
            return
    if evt.bot.hub is None:
        await evt.reply("Email is not available on this bridge.")
        return
    room_id = await start_conversation(evt.bot.hub, evt.sender, valid, subject)
    link = f"https://matrix.to/#/{room_id}"
    await evt.reply(
        f"Created the conversation with {', '.join(valid)}: {link} — accept the invite and "
        "write there.",
        f"Created the conversation with {html.escape(', '.join(valid))}: "
        f'<a href="{html.escape(link)}">open it</a> — accept the invite and write there.',
    )


CORE_COMMANDS = (
    Command("help", help_command, "Show this list of commands."),
    Command("status", status_command,
            "Show the bridge version, its encryption device and this room's encryption."),
    Command("new", new_command,
            "Start an email conversation: creates an encrypted room where what you write is "
            "mailed.", usage="<address>[, <address>…] <subject>"),
)
