"""Collapsing the quoted original under a reply, in plain text and in HTML.

In a Matrix thread the quoted mail is already the message above, so repeating it only adds noise.
Only a *trailing* quote goes: quotes interleaved with new text are an inline reply and stay, and
if removing the quote would leave nothing, the mail is kept as it was.
"""

from __future__ import annotations

import re

from .html import BLOCK_TAGS, Token, has_content, normalize_html, tokenize, too_deep

_REPLY_VERBS = (
    r"wrote|writes|schrieb|a\s+écrit|escribió|schreef|ha\s+scritto|escreveu|napisał|skrev"
    r"|kirjoitti|написал|írta|yazdı"
)
# "On Mon, 1 Jan 2024, Bob <b@x> wrote:", "Am … schrieb Bob:", "Le … a écrit :", "Bob wrote:".
ATTRIBUTION = re.compile(rf"^.{{0,300}}\b(?:{_REPLY_VERBS})\b[^:\n]{{0,80}}:\s*$", re.I)
# Wrapped over two lines the verb is far from the start, so require a known opening word too.
_ATTRIBUTION_OPENING = re.compile(r"^\s*(?:on|am|le|el|op|il|em|w|den|в)\s", re.I)
# Outlook and friends put a separator line before the original rather than quoting it.
OUTLOOK_SEPARATOR = re.compile(
    r"^\s*-{3,}\s*(?:original message|ursprüngliche nachricht|message d'origine"
    r"|mensaje original|messaggio originale|oorspronkelijk bericht)\s*-{3,}\s*$",
    re.I,
)
_MAX_ATTRIBUTION = 1000  # characters; longer text above a quote is not its attribution
_UNDERSCORE_RULE = re.compile(r"^\s*_{10,}\s*$")
_HEADER_LINE = re.compile(r"^\s*(?:from|von|de|van|da)\s?:", re.I)


def _is_quoted(line: str) -> bool:
    return line.lstrip().startswith(">")


def collapse_plain_quotes(text: str) -> str:
    """`text` without its trailing quoted block and the attribution line above it."""
    lines = text.split("\n")
    cut = _outlook_cut(lines)
    if cut is None:
        cut = _trailing_quote_cut(lines)
    if cut is None:
        return text
    kept = "\n".join(lines[:cut]).rstrip()
    return kept if kept.strip() else text


def _outlook_cut(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        if OUTLOOK_SEPARATOR.match(line):
            return i
        # "________________________________" then "From: Bob": Outlook's newer reply header.
        following = [other for other in lines[i + 1 : i + 3] if other.strip()]
        if _UNDERSCORE_RULE.match(line) and following and _HEADER_LINE.match(following[0]):
            return i
    return None


def _trailing_quote_cut(lines: list[str]) -> int | None:
    end = len(lines)
    while end > 0 and not lines[end - 1].strip():
        end -= 1
    start = end
    while start > 0 and (_is_quoted(lines[start - 1]) or not lines[start - 1].strip()):
        start -= 1
    while start < end and not lines[start].strip():
        start += 1
    if start == end:
        return None  # the mail does not end with a quote
    above = start - 1
    while above >= 0 and not lines[above].strip():
        above -= 1
    if above >= 1 and _wrapped_attribution(lines[above - 1], lines[above]):
        return above - 1
    if above >= 0 and ATTRIBUTION.match(lines[above]):
        return above
    return start


def _wrapped_attribution(first: str, second: str) -> bool:
    """An attribution wrapped over two lines: "On Mon, … Bob <" / "bob@example.org> wrote:"."""
    if not _ATTRIBUTION_OPENING.match(first) or _ATTRIBUTION_OPENING.match(second):
        return False
    if first.rstrip().endswith((".", "!", "?")) or ATTRIBUTION.match(first):
        return False  # a sentence of its own, or an attribution by itself
    return bool(ATTRIBUTION.match(f"{first.strip()} {second.strip()}"))


def _is_cite_marker(token: Token) -> bool:
    classes = token.attrs.get("class", "").split()
    if token.tag == "blockquote":
        # Apple Mail and Thunderbird: type="cite"; Gmail puts its class on the blockquote too.
        return token.attrs.get("type", "").lower() == "cite" or "gmail_quote" in classes
    if token.tag == "div":
        return bool({"gmail_quote", "yahoo_quoted", "protonmail_quote"} & set(classes))
    return False


def _is_outlook_marker(token: Token) -> bool:
    if token.kind == "text":
        return bool(OUTLOOK_SEPARATOR.match(token.text))
    # Outlook (desktop and web) starts the quoted original with these, and it runs to the end.
    return token.tag == "div" and token.attrs.get("id") in ("divRplyFwdMsg", "appendonsend")


def collapse_html_quotes(html: str, *, checked: bool = False) -> str:
    """`html` without a trailing reply quote. The result still needs `sanitize_html`.
    `checked`: the caller knows `html` is not `too_deep`."""
    if not checked and too_deep(html):
        return html  # sanitize_html will reduce it to text; there is no structure to trust
    normalized = normalize_html(html)
    tokens = tokenize(normalized)
    ends = _element_ends(tokens)
    last_visible = _last_visible_end(tokens)
    for index, token in enumerate(tokens):
        if token.kind == "end":
            continue
        if _is_outlook_marker(token):
            cut_end = len(normalized)
        elif token.kind == "start" and _is_cite_marker(token):
            cut_end = ends.get(index, len(normalized))
            if last_visible > cut_end:
                continue  # interleaved: new text follows this quote
        else:
            continue
        cut_start = _attribution_start(tokens, index)
        result = normalized[:cut_start] + normalized[cut_end:]
        # Scraps of the tags the cut split are re-balanced by the sanitiser.
        return result if has_content(result) else html
    return html


def _element_ends(tokens: list[Token]) -> dict[int, int]:
    """For each start tag's index, the offset just after its matching end tag."""
    ends: dict[int, int] = {}
    stack: list[int] = []
    for index, token in enumerate(tokens):
        if token.kind == "start" and token.tag not in ("br", "hr", "img"):
            stack.append(index)
        elif token.kind == "end":
            # nh3 output is balanced, but be lenient: pop to the nearest matching start.
            for depth in range(len(stack) - 1, -1, -1):
                if tokens[stack[depth]].tag == token.tag:
                    ends[stack[depth]] = token.end
                    del stack[depth:]
                    break
    return ends


def _last_visible_end(tokens: list[Token]) -> int:
    """Where the last visible thing (non-blank text or an image) ends, 0 if there is none."""
    for token in reversed(tokens):
        if (token.kind == "text" and token.text.strip()) or (
            token.kind == "start" and token.tag == "img"
        ):
            return token.end
    return 0


def _attribution_start(tokens: list[Token], index: int) -> int:
    """Where the cut should begin: before the attribution line (if there is one) and before
    separators (<br>, <hr>) directly above the quote."""
    cut = tokens[index].start
    collected: list[str] = []  # text above the quote, last first
    length = 0
    boundary: Token | None = None
    for token in reversed(tokens[:index]):
        if token.kind == "text":
            if length or token.text.strip():
                collected.append(token.text)
                length += len(token.text)
                if length > _MAX_ATTRIBUTION:
                    return cut  # a paragraph, not an attribution line
            continue
        if not length:
            if token.kind == "start" and token.tag in ("br", "hr"):
                cut = token.start  # a separator directly above the quote goes with it
            continue
        if token.tag in BLOCK_TAGS or token.tag == "br":
            boundary = token
            break
    collected.reverse()
    line = " ".join(" ".join(collected).split())
    if not line or not ATTRIBUTION.match(line):
        return cut
    if boundary is None:
        return 0
    # A block that opens right before the attribution goes with it; after an end tag or <br>
    # the cut starts behind it.
    return boundary.start if boundary.kind == "start" and boundary.tag != "br" else boundary.end
