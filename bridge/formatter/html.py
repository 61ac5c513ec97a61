"""HTML in both directions: sanitising to the Matrix `formatted_body` subset, HTML → plain text
for clients without HTML, and plain text → HTML.

Everything that leaves this module as HTML has been through nh3 with the strict Matrix settings;
the looser `normalize_html` output exists only so that `quotes.py` can find quote markers
(`class`, `id`, `type`) before they are stripped.
"""

from __future__ import annotations

import html as html_lib
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

import nh3

# https://spec.matrix.org/v1.11/client-server-api/#mroommessage-msgtypes (m.text formatted_body)
MATRIX_TAGS = frozenset(
    {"font", "del", "s", "blockquote", "p", "a", "ul", "ol", "sup", "sub", "li", "b", "i", "u"}
    | {"strong", "em", "code", "hr", "br", "div", "table", "thead", "tbody", "tr", "th", "td"}
    | {"caption", "pre", "span", "img", "details", "summary"}
    | {f"h{n}" for n in range(1, 7)}
)
MATRIX_ATTRIBUTES = {
    "font": {"data-mx-bg-color", "data-mx-color", "color"},
    "span": {"data-mx-bg-color", "data-mx-color", "data-mx-spoiler", "data-mx-maths"},
    "div": {"data-mx-maths"},
    "a": {"href", "target"},
    "img": {"src", "alt", "title", "width", "height"},
    "ol": {"start"},
    "code": {"class"},
}
LINK_SCHEMES = frozenset({"http", "https", "ftp", "mailto", "magnet"})
# Removed together with their content: code, CSS and document metadata are never message text.
DROP_CONTENT_TAGS = frozenset(
    {"script", "style", "title", "noscript", "template", "head", "iframe", "object", "svg"}
)
# Only what quotes.py needs to recognise reply quotes from Gmail, Apple Mail, Thunderbird, Outlook.
_QUOTE_MARKER_ATTRIBUTES = {"blockquote": {"type", "class"}, "div": {"class", "id"}}

_COLOR = re.compile(r"#[0-9a-fA-F]{6}|#[0-9a-fA-F]{3}|[a-zA-Z]{1,20}")
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}")
_NUMBER = re.compile(r"-?[0-9]{1,9}")
_SIZE = re.compile(r"[0-9]{1,5}")
_LANGUAGE_CLASS = re.compile(r"language-[A-Za-z0-9_+#.-]{1,40}")
# Browsers drop ASCII tab and newline anywhere in a URL, so "java\nscript:" is "javascript:".
_URL_IGNORED = re.compile(r"[\t\n\r]")
_URL_EDGES = "".join(chr(c) for c in range(0x21))  # what browsers trim around a URL
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")


def _safe_link(value: str) -> str | None:
    url = _URL_IGNORED.sub("", value).strip(_URL_EDGES)
    match = _SCHEME.match(url)
    # Relative links have no base in Matrix, so they go too.
    if match and match.group(1).lower() in LINK_SCHEMES:
        return url
    return None


def _attribute_filter(tag: str, attr: str, value: str) -> str | None:
    """Per-value checks nh3's allow-lists cannot express. Must never raise."""
    if attr == "href":
        return _safe_link(value)
    if attr == "src":
        # Remote images would leak the reader's IP and read receipts to the sender; cid: parts are
        # posted as their own encrypted events by the bridge. Only uploaded (mxc) images remain.
        return value if value.startswith("mxc://") else None
    if attr in ("width", "height"):
        return value if _SIZE.fullmatch(value) else None
    if attr == "start":
        return value if _NUMBER.fullmatch(value) else None
    if attr == "class" and tag == "code":
        found = _LANGUAGE_CLASS.search(value)
        return found.group(0) if found else None
    if attr in ("data-mx-color", "data-mx-bg-color"):
        return value if _HEX_COLOR.fullmatch(value) else None
    if attr == "color":
        return value if _COLOR.fullmatch(value) else None
    if attr == "target":
        return value if value == "_blank" else None
    if attr in ("data-mx-spoiler", "data-mx-maths", "alt", "title"):
        return value[:1000]
    return value  # rel, set by nh3 itself


_IMG_WITHOUT_SRC = re.compile(r'<img(?![^>]*\ssrc=")[^>]*>')


def _scrub(text: str) -> str:
    # Lone surrogates (from surrogateescape'd bytes) cannot cross into nh3's Rust strings.
    return text.encode("utf-8", "replace").decode("utf-8")


# html5ever scans the stack of open elements for many start tags, so parsing costs depth × tags:
# 100,000 nested <div>s take a minute. Real mail stays far below this depth.
MAX_HTML_DEPTH = 500
_TAG_OPENING = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)")
# Void elements and those a sibling closes implicitly: they do not deepen the tree.
_NOT_NESTING = frozenset(
    {"br", "hr", "img", "meta", "link", "input", "col", "area", "wbr", "source", "base", "embed"}
    | {"track", "param", "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup", "thead"}
    | {"tbody", "tfoot", "colgroup", "caption", "rb", "rt", "rp", "html", "head", "body", "a"}
    | {"nobr"}
)


def too_deep(html: str) -> bool:
    """Whether `html` might nest deeper than MAX_HTML_DEPTH. A linear over-estimate: each end
    tag closes at most one element of its own name, as if nothing were closed implicitly."""
    open_by_name: dict[str, int] = {}
    depth = 0
    for match in _TAG_OPENING.finditer(html):
        name = match.group(2).lower()
        if name in _NOT_NESTING:
            continue
        if not match.group(1):
            open_by_name[name] = open_by_name.get(name, 0) + 1
            depth += 1
            if depth > MAX_HTML_DEPTH:
                return True
        elif open_by_name.get(name):
            open_by_name[name] -= 1
            depth -= 1
    return False


def sanitize_html(html: str, *, checked: bool = False) -> str:
    """The Matrix-safe subset of `html`: allowed tags and attributes, safe links, mxc images.
    HTML nested too deeply to parse in reasonable time is reduced to its text. `checked`: the
    caller knows it is not (the check is a Python loop over every tag: 0.4 s for 1 MB)."""
    if not checked and too_deep(html):
        return text_to_html(html_to_text(html))
    cleaned = nh3.clean(
        _scrub(html),
        tags=set(MATRIX_TAGS),
        clean_content_tags=set(DROP_CONTENT_TAGS),
        attributes={tag: set(attrs) for tag, attrs in MATRIX_ATTRIBUTES.items()},
        attribute_filter=_attribute_filter,
        url_schemes=set(LINK_SCHEMES) | {"mxc"},
        link_rel="noopener",
        strip_comments=True,
    )
    # nh3 escapes "<" and ">" inside attribute values, so a tag ends at the first ">".
    cleaned = _IMG_WITHOUT_SRC.sub("", cleaned)
    # Mailers leave empty lines at the end, and cutting a quote away leaves more.
    return _trim_trailing_blanks(cleaned)


_BLANK_ENDINGS = ("<br>", "<div></div>", "<p></p>", "<span></span>")


def _trim_trailing_blanks(html: str) -> str:
    # Index arithmetic rather than a regex or repeated slicing: both are quadratic on a long run
    # of "<br>", and this input comes from the sender.
    end = len(html.rstrip())
    while True:
        for ending in _BLANK_ENDINGS:
            if html.endswith(ending, 0, end):
                end -= len(ending)
                break
        else:
            for tag in ("div", "p", "span"):  # "<div><br></div>": drop the <br>, then the div
                if html.endswith(f"<{tag}><br></{tag}>", 0, end):
                    end -= len(f"<{tag}><br></{tag}>")
                    break
            else:
                return html[:end].strip()
        while end and html[end - 1].isspace():
            end -= 1


def normalize_html(html: str) -> str:
    """Well-formed HTML with quote markers kept: input for `quotes.collapse_html_quotes` only."""
    attributes = {tag: set(attrs) for tag, attrs in MATRIX_ATTRIBUTES.items()}
    for tag, attrs in _QUOTE_MARKER_ATTRIBUTES.items():
        attributes[tag] = attributes.get(tag, set()) | attrs
    return nh3.clean(
        _scrub(html),
        tags=set(MATRIX_TAGS),
        clean_content_tags=set(DROP_CONTENT_TAGS),
        attributes=attributes,
        link_rel=None,
        strip_comments=True,
    )


@dataclass(slots=True)
class Token:
    """One tag or text run of nh3-serialised HTML, with its offsets in that string."""

    kind: str  # "start", "end" or "text"
    tag: str  # "" for text
    start: int
    end: int
    attrs: dict[str, str] = field(default_factory=dict)
    text: str = ""  # unescaped, for text tokens


VOID_TAGS = frozenset({"br", "hr", "img"})
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9]*)([^>]*)>")
_ATTR = re.compile(r'([^\s="]+)(?:="([^"]*)")?')


def tokenize(html: str) -> list[Token]:
    """Split nh3 output into tokens. Only valid for nh3 output, where text and attribute values
    have "<" and ">" escaped, so a regex finds every tag exactly."""
    tokens: list[Token] = []
    pos = 0
    for match in _TAG.finditer(html):
        start, end = match.span()
        if start > pos:
            tokens.append(Token("text", "", pos, start, text=_unescape(html[pos:start])))
        raw_attrs = match.group(3)
        attrs = {k.lower(): _unescape(v) for k, v in _ATTR.findall(raw_attrs)} if raw_attrs else {}
        kind = "end" if match.group(1) else "start"
        tokens.append(Token(kind, match.group(2).lower(), start, end, attrs))
        pos = end
    if pos < len(html):
        tokens.append(Token("text", "", pos, len(html), text=_unescape(html[pos:])))
    return tokens


def _unescape(text: str) -> str:
    return html_lib.unescape(text) if "&" in text else text


_ANY_TAG = re.compile(r"<[^>]*>")
_MXC_IMAGE = re.compile(r'<img[^>]*\ssrc="mxc://')


def has_content(html: str) -> bool:
    """Whether nh3 output shows anything: non-blank text or an image that will stay."""
    return bool(_unescape(_ANY_TAG.sub("", html)).strip()) or bool(_MXC_IMAGE.search(html))


def text_to_html(text: str) -> str:
    """Plain text as HTML that looks the same: escaped, line breaks kept."""
    return html_lib.escape(text, quote=False).replace("\n", "<br>")


def json_size(text: str) -> int:
    """Bytes `text` takes as a JSON string in an event (ASCII-escaped: the worst case)."""
    return len(json.dumps(text))


def truncate_html(html: str, budget: int) -> str:
    """The longest prefix of sanitised `html` that, with its open tags closed, fits `budget`
    (JSON size). Cut between tags and entities, never inside one."""
    if json_size(html) <= budget:
        return html
    best = ""
    low, high = 0, min(len(html), budget)  # every character costs at least one byte
    while low < high:
        middle = (low + high + 1) // 2
        candidate = sanitize_html(_prefix(html, middle))  # closes what the cut left open
        if json_size(candidate) <= budget:
            low, best = middle, candidate
        else:
            high = middle - 1
    return best


def _prefix(html: str, length: int) -> str:
    prefix = html[:length]
    if prefix.rfind("<") > prefix.rfind(">"):
        prefix = prefix[: prefix.rfind("<")]  # in nh3 output, "<" only ever opens a tag
    amp = prefix.rfind("&")
    if amp != -1 and ";" not in prefix[amp:]:
        prefix = prefix[:amp]
    return prefix


BLOCK_TAGS = frozenset(
    {"p", "div", "blockquote", "ul", "ol", "li", "table", "tr", "pre", "hr", "details"}
    | {"summary", "caption", "thead", "tbody"}
    | {f"h{n}" for n in range(1, 7)}
)
_PARAGRAPH_TAGS = frozenset({"p", "blockquote", "pre", "table", "ul", "ol"}) | {
    f"h{n}" for n in range(1, 7)
}
# Quote levels beyond this share one prefix. Writing "> " once per level on every line made the
# text quadratic in the nesting: 3,000 levels (90 KB of HTML) became 18 MB of text and took 6 s.
# Real threads rarely quote more than a dozen levels deep.
MAX_QUOTE_PREFIX = 20
_WHITESPACE = re.compile(r"\s+")


# Hand-written rather than html2text (a dependency) or inscriptis, measured on 2026-12-04:
# html2text writes Markdown where `body` wants plain text ("[the site](url)", "\- dash",
# pipe tables, "* * *", trailing double spaces), and it also prefixes every line with one ">"
# per quote level, so 2,000 nested quotes (104 KB) came out as 4 MB. This one keeps each line
# as a list of pieces (no string rebuilt per append) and caps the prefix: linear in its input.
class _TextExtractor(HTMLParser):
    """Renders HTML as readable plain text: blocks on their own lines, list bullets, quotes
    prefixed with "> " and links as "text (url)"."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.done: list[str] = []  # finished lines, without their quote prefix
        self.done_depth: list[int] = []  # quote depth of each finished line
        self.done_visible: list[bool] = []  # whether it has non-blank text
        self.parts: list[str] = []  # pieces of the line being written
        self.length = 0  # its length in characters
        self.visible = False
        self.line_depth = 0
        self.depth = 0
        self.pre = 0
        self.lists: list[int] = []  # per open list: next number, or 0 for bullets
        self.links: list[tuple[str, int, int]] = []  # href, line number and column at start
        self.skip = 0  # inside script/style: sanitised input has none, raw input might

    def _add(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.length += len(text)
            self.visible = self.visible or not text.isspace()

    def _end_line(self) -> None:
        self.done.append("".join(self.parts))
        self.done_depth.append(self.line_depth)
        self.done_visible.append(self.visible)
        self.parts, self.length, self.visible, self.line_depth = [], 0, False, self.depth

    def _newline(self, blank: bool = False) -> None:
        if self.visible:
            self._end_line()
        if blank and self.done and self.done_visible[-1]:
            self._end_line()
        self.line_depth = self.depth

    def _ends_with_space(self) -> bool:
        return not self.parts or self.parts[-1].endswith(" ")

    def _write(self, text: str) -> None:
        if self.pre:
            pieces = text.split("\n")
            self._add(pieces[0])
            for piece in pieces[1:]:
                self._end_line()
                self._add(piece)
            return
        text = _WHITESPACE.sub(" ", text)
        if self._ends_with_space():
            text = text.lstrip(" ")
        self._add(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in DROP_CONTENT_TAGS:
            self.skip += 1
        elif tag == "br":
            self._end_line()
        elif tag in BLOCK_TAGS:
            self._newline(blank=tag in _PARAGRAPH_TAGS)
        if tag == "blockquote":
            self.depth += 1
            self.line_depth = self.depth
        elif tag == "pre":
            self.pre += 1
        elif tag in ("ul", "ol"):
            start = dict(attrs).get("start") or "1"
            self.lists.append((int(start) if _NUMBER.fullmatch(start) else 1) if tag == "ol" else 0)
        elif tag == "li":
            self._write(self._bullet())
        elif tag == "hr":
            self._write("----")
            self._newline()
        elif tag == "a":
            self.links.append((dict(attrs).get("href") or "", len(self.done), self.length))
        elif tag in ("td", "th") and not self._ends_with_space():
            self._add(" ")  # cells of a row side by side

    def _bullet(self) -> str:
        if not self.lists or self.lists[-1] == 0:
            return "- "
        number = self.lists[-1]
        self.lists[-1] += 1
        return f"{number}. "

    def handle_endtag(self, tag: str) -> None:
        if tag in DROP_CONTENT_TAGS:
            self.skip = max(0, self.skip - 1)
        elif tag == "a" and self.links:
            self._close_link()
        elif tag == "blockquote":
            self.depth = max(0, self.depth - 1)
        elif tag == "pre":
            self.pre = max(0, self.pre - 1)
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()
        if tag in BLOCK_TAGS:
            self._newline(blank=tag in _PARAGRAPH_TAGS)

    def _close_link(self) -> None:
        href, line, column = self.links.pop()
        if not href:
            return
        same_line = line == len(self.done)
        size = self.length - column if same_line else 0
        # Whitespace runs are collapsed, so a label longer than this cannot be the address.
        if size > len(href) + 2:
            self._write(f" ({href})")
            return
        label = self._tail(size).strip()
        # A link whose text already is its address says nothing more with "(url)" after it.
        if label not in (href, href.removeprefix("mailto:")):
            self._write(f" ({href})" if label else href)

    def _tail(self, size: int) -> str:
        """The last `size` characters of the current line, looking at no more pieces than that."""
        pieces: list[str] = []
        for piece in reversed(self.parts):
            if size <= 0:
                break
            pieces.append(piece[-size:])
            size -= len(piece)
        return "".join(reversed(pieces))

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self._write(data)

    def text(self) -> str:
        self._end_line()
        depths = self.done_depth
        # A blank line belongs to a quote only if the quote goes on after it.
        following = 0
        for index in range(len(self.done) - 1, -1, -1):
            if self.done_visible[index]:
                following = depths[index]
            else:
                depths[index] = min(depths[index], following)
        out = [
            ("> " * min(depth, MAX_QUOTE_PREFIX) + line.rstrip()).rstrip()
            for line, depth in zip(self.done, depths, strict=True)
        ]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip("\n")


def html_to_text(html: str) -> str:
    """A plain-text rendering of (sanitised) HTML, for `body` when the mail had only HTML.
    Output size and time are linear in the input, whatever its nesting."""
    extractor = _TextExtractor()
    extractor.feed(html)
    extractor.close()
    return extractor.text()
