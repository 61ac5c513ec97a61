"""`ParsedMail` → the content of a Matrix text event. Pure: no I/O."""

from __future__ import annotations

import html as html_lib
from collections.abc import Sequence
from dataclasses import dataclass

from .from_email import Address, ParsedMail
from .html import has_content, json_size, text_to_html, truncate_html

PLACEHOLDER = "(no text)"
# Events are capped at 64 KiB. Encrypted, the content is base64 (4/3) inside an envelope, so the
# two bodies (measured as ASCII-escaped JSON, the worst case) must stay well below 48 KiB.
EVENT_BUDGET = 40_000
# A subject is a heading: past this it is shortened in the event, so that a 10,000-character
# subject (legal: Postfix takes headers up to 100 KB) does not push the body out of it.
MAX_SUBJECT_DISPLAY = 300
# How many people `others_line` names before it only counts.
MAX_NAMED = 10
_TRUNCATED_TEXT = "\n\n(message truncated)"
_TRUNCATED_HTML = "<p><em>(message truncated)</em></p>"


@dataclass
class MatrixContent:
    """The text parts of an m.room.message event."""

    body: str
    formatted_body: str | None  # HTML, only when there is formatting worth sending
    truncated: bool = False  # the mail was cut to fit into an event


def display_subject(subject: str, limit: int = MAX_SUBJECT_DISPLAY) -> str:
    """`subject` shortened for display, cut at a word where one is near the limit."""
    if len(subject) <= limit:
        return subject
    cut = subject[: limit - 1]
    space = cut.rfind(" ")
    # Unless the cut already falls between two words, drop the word it splits.
    if not subject[limit - 1].isspace() and space > limit * 3 // 4:
        cut = cut[:space]
    return cut.rstrip() + "…"


def render_message(mail: ParsedMail, *, root: bool, budget: int = EVENT_BUDGET) -> MatrixContent:
    """The event text for a mail. `root` (the first mail of a thread) leads with the subject in
    bold on its own line; replies are the body alone. Never empty: a placeholder stands in."""
    text = mail.text if mail.text.strip() else PLACEHOLDER
    html = mail.html if mail.html and has_content(mail.html) else None
    subject = display_subject(mail.subject)
    if root and subject:
        body = f"{subject}\n\n{text}"
        heading = f"<strong>{html_lib.escape(subject, quote=False)}</strong><br><br>"
        formatted = heading + (html or text_to_html(text))
    else:
        body, formatted = text, html
    if json_size(body) + json_size(formatted or "") <= budget:
        return MatrixContent(body, formatted)
    if formatted is not None:
        # HTML is the larger of the two; give it the bigger share.
        formatted = truncate_html(formatted, budget * 3 // 5 - len(_TRUNCATED_HTML) - 2)
        formatted += _TRUNCATED_HTML
    room = budget - json_size(formatted or "") - len(_TRUNCATED_TEXT) - 2
    return MatrixContent(_truncate_text(body, room) + _TRUNCATED_TEXT, formatted, truncated=True)


def _truncate_text(text: str, budget: int) -> str:
    """The longest prefix of `text` whose JSON size fits `budget`."""
    text = text[: max(0, budget)]  # every character costs at least one byte
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if json_size(text[:middle]) <= budget:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip()


def others_line(people: Sequence[Address], *, named: int = MAX_NAMED) -> str:
    """One line for the people on a mail who are not seated in the room, e.g.
    "Also on this mail: Ann <ann@x>, bob@y and 1,998 others". "" when there are none.
    For the hub, which seats a capped number of participants and names the rest in the text."""
    if not people:
        return ""
    shown = [f"{p.name} <{p.address}>" if p.name else p.address for p in people[:named]]
    rest = len(people) - len(shown)
    if rest:
        others = "other" if rest == 1 else "others"
        return f"Also on this mail: {', '.join(shown)} and {rest:,} {others}"
    if len(shown) == 1:
        return f"Also on this mail: {shown[0]}"
    return f"Also on this mail: {', '.join(shown[:-1])} and {shown[-1]}"
