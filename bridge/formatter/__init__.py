"""Pure formatters between email and Matrix: plain data in, plain data out, no I/O."""

from __future__ import annotations

from .from_email import (
    Address,
    Attachment,
    MatrixContent,
    ParsedMail,
    parse_mail,
    render_message,
)

__all__ = [
    "Address",
    "Attachment",
    "MatrixContent",
    "ParsedMail",
    "parse_mail",
    "render_message",
]
