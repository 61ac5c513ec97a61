"""The words of the checkup: the report, the welcome and the nudge, as plain text and HTML.

Pure functions of a SecurityReport. Every missing item comes with the concrete Element steps, so
the message is useful on its own, without a link to documentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from html import escape

from .checkup import Backup, Device, Identity, SecurityReport

STEPS_IDENTITY = (
    "In Element: Settings → Security & Privacy → Secure Backup → “Set up Secure Backup” "
    "(recent Element: Settings → Encryption → “Set up recovery”). This creates your "
    "cross-signing identity; save the recovery key it shows somewhere safe."
)
STEPS_IDENTITY_BROKEN = (
    "In Element: Settings → Security & Privacy → Cross-signing → “Reset” (recent Element: "
    "Settings → Encryption → “Reset cryptographic identity”), then verify your other sessions."
)
STEPS_DEVICES = (
    "In Element, on a session that is already verified: Settings → Sessions, select the session "
    "→ “Verify session”, and compare the emoji on both. Or, on the unverified session itself, "
    "choose “Verify with another device” or enter your recovery key. A session you do not "
    "recognise: sign it out there and change your password."
)
STEPS_DEVICES_NO_IDENTITY = (
    "Sessions can only be verified once you have a cross-signing identity (see above); then "
    "verify each one: Settings → Sessions, select the session → “Verify session”."
)
STEPS_BACKUP = (
    "Without it, losing or signing out all your sessions loses your message history. In Element: "
    "Settings → Security & Privacy → Secure Backup → “Set up Secure Backup” (recent Element: "
    "Settings → Encryption → turn “Allow key storage” on)."
)
STEPS_BACKUP_UNKNOWN = (
    "This bridge is not allowed to look at accounts. Check in Element: Settings → Security & "
    "Privacy → Secure Backup (recent Element: Settings → Encryption → Key storage)."
)
FOOTER = "Send “checkup” to run this again, “checkup off” to stop my reminders."

OK, MISSING, UNKNOWN = "✓", "✗", "?"


@dataclass
class Item:
    mark: str
    text: str
    steps: str = ""


def _devices(devices: list[Device]) -> str:
    return ", ".join(d.label() for d in devices)


def identity_item(report: SecurityReport) -> Item:
    identity = report.status.identity
    if identity == Identity.OK:
        return Item(OK, "Cross-signing: you have a cross-signing identity.")
    if identity == Identity.BROKEN:
        return Item(
            MISSING,
            "Cross-signing: your identity is incomplete (its self-signing key is missing or not "
            "signed by your master key).",
            STEPS_IDENTITY_BROKEN,
        )
    return Item(MISSING, "Cross-signing: you have no cross-signing identity yet.", STEPS_IDENTITY)


def devices_item(report: SecurityReport) -> Item:
    status = report.status
    if not status.devices:
        return Item(OK, "Sessions: none of your sessions has encryption keys yet.")
    if not status.unsigned:
        count = len(status.devices)
        which = "your one session is" if count == 1 else f"all {count} of your sessions are"
        return Item(OK, f"Sessions: {which} verified.")
    steps = STEPS_DEVICES if status.identity == Identity.OK else STEPS_DEVICES_NO_IDENTITY
    return Item(
        MISSING,
        f"Sessions not verified by your identity ({len(status.unsigned)} of "
        f"{len(status.devices)}): {_devices(status.unsigned)}.",
        steps,
    )


def backup_item(report: SecurityReport) -> Item:
    if report.backup == Backup.PRESENT:
        version = f" (version {report.backup_version})" if report.backup_version else ""
        return Item(OK, f"Key backup: a server-side key backup exists{version}.")
    if report.backup == Backup.MISSING:
        return Item(MISSING, "Key backup: you have no server-side key backup.", STEPS_BACKUP)
    return Item(UNKNOWN, "Key backup: I could not check whether you have one.",
                STEPS_BACKUP_UNKNOWN)


def summary(report: SecurityReport) -> str:
    if report.all_clear:
        return "All clear: your encryption is in good shape."
    status = report.status
    if status.identity == Identity.OK and not status.unsigned and report.backup == Backup.UNKNOWN:
        return "Nothing to fix that I can see."
    return "Some things need your attention:"


def render_report(report: SecurityReport, intro: list[str] | None = None) -> tuple[str, str]:
    """The checkup as (plain text, HTML); intro paragraphs (plain text) go first, by default
    the mailbox address."""
    if intro is None:
        intro = [f"Your mailbox: {report.mailbox}"] if report.mailbox else []
    items = [identity_item(report), devices_item(report), backup_item(report)]
    plain = [*intro, f"Encryption checkup — {summary(report)}"]
    html = [f"<p>{escape(p)}</p>" for p in intro]
    html.append(f"<p><b>Encryption checkup</b> — {escape(summary(report))}</p><ul>")
    for item in items:
        plain.append(f"{item.mark} {item.text}" + (f"\n   {item.steps}" if item.steps else ""))
        steps = f"<br>{escape(item.steps)}" if item.steps else ""
        html.append(f"<li>{item.mark} {escape(item.text)}{steps}</li>")
    html.append("</ul>")
    plain.append(FOOTER)
    html.append(f"<p>{escape(FOOTER)}</p>")
    return "\n\n".join(plain), "".join(html)


def render_welcome(report: SecurityReport, name: str = "") -> tuple[str, str]:
    """The welcome, greeting by display name (the user ID when they have none)."""
    intro = [
        f"Hello {name or report.user_id}, I'm the Cloakroom bridge: I bring your email into "
        "encrypted rooms, and I look out for your encryption. This is the only message you will "
        "get from me unless something needs your attention.",
    ]
    if report.mailbox:
        intro.append(
            f"Your mailbox is {report.mailbox}: mail sent there arrives here in encrypted rooms, "
            "and what you answer there leaves as mail."
        )
    return render_report(report, intro)


def render_nudge(devices: list[Device], identity: Identity) -> tuple[str, str]:
    """The short unsolicited message about sessions that appeared without verification."""
    what = "A new session" if len(devices) == 1 else "New sessions"
    steps = STEPS_DEVICES if identity == Identity.OK else STEPS_DEVICES_NO_IDENTITY
    head = f"{what} signed in to your account without being verified: {_devices(devices)}."
    tail = "Send “checkup” for the full picture, “checkup off” to stop these reminders."
    plain = f"⚠ {head}\n\n{steps}\n\n{tail}"
    html = f"<p>⚠ {escape(head)}</p><p>{escape(steps)}</p><p>{escape(tail)}</p>"
    return plain, html
