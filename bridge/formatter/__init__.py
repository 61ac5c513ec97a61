"""Pure formatters between email and Matrix: plain data in, plain data out, no I/O."""

from __future__ import annotations

from .dsn import Dsn, DsnRecipient, describe, parse_dsn
from .from_email import Address, Attachment, ParsedMail, parse_mail
from .to_email import (
    OutgoingAttachment,
    OutgoingMail,
    compose,
    matrix_body_to_text,
    matrix_html_to_email_html,
    new_message_id,
    reply_subject,
)
from .to_matrix import MatrixContent, display_subject, others_line, render_message

__all__ = [
    "Address",
    "Attachment",
    "MatrixContent",
    "ParsedMail",
    "parse_mail",
    "render_message",
    "display_subject",
    "others_line",
    "Dsn",
    "DsnRecipient",
    "describe",
    "parse_dsn",
    "OutgoingAttachment",
    "OutgoingMail",
    "compose",
    "matrix_body_to_text",
    "matrix_html_to_email_html",
    "new_message_id",
    "reply_subject",
]
