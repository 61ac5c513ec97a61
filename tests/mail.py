"""Building and sending real mail for the integration tests (stdlib smtplib, real SMTP)."""

from __future__ import annotations

import asyncio
import secrets
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid


def make_mail(
    *,
    to: str,
    sender: str = "Bob Example <bob@example.org>",
    subject: str = "Hello",
    text: str = "Hi there",
    html: str | None = None,
    cc: str | None = None,
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    if cc:
        msg["Cc"] = cc
    msg["Subject"] = subject
    msg["Date"] = formatdate(localtime=True)
    msg["Message-ID"] = message_id or make_msgid(domain="example.org")
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(text)
    if html is not None:
        msg.add_alternative(html, subtype="html")
    return msg


def unique(prefix: str = "m") -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


def _send(port: int, mail_from: str, rcpts: list[str], data: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        return smtp.sendmail(mail_from, rcpts, data)


async def send(port: int, msg: EmailMessage | bytes, rcpts: list[str],
               mail_from: str = "bob@example.org") -> dict:
    """Send through a real SMTP session; raises smtplib errors as a client would see them."""
    # SMTP lines end in CRLF; smtplib does not convert bytes, so serialise with CRLF ourselves.
    data = msg if isinstance(msg, bytes) else msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))
    return await asyncio.to_thread(_send, port, mail_from, rcpts, data)


def smtp_dialogue(port: int, rcpt: str, mail_from: str = "bob@example.org") -> tuple[int, str]:
    """MAIL + one RCPT; returns the RCPT reply (code, text) without sending data."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("test.example.org")
        smtp.mail(mail_from)
        code, text = smtp.docmd("RCPT", f"TO:{rcpt}")
        return code, text.decode()
