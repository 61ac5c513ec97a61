"""Attachment metadata without I/O: safe filenames, Matrix msgtypes and cheap image dimensions.

Dimensions are read from the first bytes of the file (PNG IHDR, GIF screen descriptor, JPEG SOFn,
WebP VP8/VP8L/VP8X) so that the bridge can send `info.w`/`info.h` without decoding the image.
"""

from __future__ import annotations

import re
import struct
import unicodedata

MAX_FILENAME_BYTES = 255

# Deterministic on purpose: `mimetypes` reads /etc/mime.types, so its answers differ per machine.
_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/svg+xml": ".svg",
    "image/bmp": ".bmp",
    "image/tiff": ".tiff",
    "image/heic": ".heic",
    "video/mp4": ".mp4",
    "video/webm": ".webm",
    "video/quicktime": ".mov",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
    "audio/wav": ".wav",
    "application/pdf": ".pdf",
    "application/zip": ".zip",
    "application/json": ".json",
    "application/pgp-signature": ".asc",
    "application/pgp-encrypted": ".asc",
    "application/pkcs7-signature": ".p7s",
    "application/x-pkcs7-signature": ".p7s",
    "application/ms-tnef": ".dat",
    "message/rfc822": ".eml",
    "message/delivery-status": ".txt",
    "text/plain": ".txt",
    "text/html": ".html",
    "text/calendar": ".ics",
    "text/csv": ".csv",
}
_STEMS = {"image": "image", "video": "video", "audio": "audio", "message": "message"}

# Bidi overrides and isolates make "invoice\u202egnp.exe" display as "invoiceexe.png".
_BIDI = {"\u200e", "\u200f", "\u061c"} | {chr(c) for c in range(0x202A, 0x202F)}
_BIDI |= {chr(c) for c in range(0x2066, 0x206A)}
# Characters that are separators or reserved on some filesystem the file may be saved to.
_RESERVED = re.compile(r'[<>:"|?*]')
_EXTENSION = re.compile(r"\.[^.\s]{1,16}$")


def fallback_filename(content_type: str) -> str:
    """A name for a part that brought none, e.g. "image.png" or "attachment.bin"."""
    major = content_type.partition("/")[0]
    if content_type == "text/calendar":
        stem = "invite"
    else:
        stem = _STEMS.get(major, "attachment")
    return stem + _EXTENSIONS.get(content_type, ".bin")


def sanitize_filename(name: str | None, content_type: str) -> str:
    """Turn a sender-chosen filename into one that is safe to show, store and download.

    Keeps only the last path component, drops control and bidi characters, collapses whitespace,
    strips leading dots (no hidden files) and limits the result to 255 UTF-8 bytes while keeping
    the extension. Falls back to a name derived from the content type when nothing is left.
    """
    if not name:
        return fallback_filename(content_type)
    name = unicodedata.normalize("NFC", name)
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if ch not in _BIDI)
    name = "".join(" " if _is_control(ch) else ch for ch in name)
    name = _RESERVED.sub(" ", name)
    name = " ".join(name.split())
    # Leading dots hide the file (and "..", "." are not names); trailing dots and spaces are
    # silently dropped by Windows, which would change the extension it sees.
    name = name.lstrip(". ").rstrip(". ")
    if not name:
        return fallback_filename(content_type)
    return _limit_length(name)


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Zl", "Zp")


def _limit_length(name: str) -> str:
    if len(name.encode("utf-8")) <= MAX_FILENAME_BYTES:
        return name
    match = _EXTENSION.search(name)
    ext = match.group(0) if match else ""
    stem = name[: len(name) - len(ext)]
    budget = MAX_FILENAME_BYTES - len(ext.encode("utf-8"))
    # Cut on a character boundary, never inside a multi-byte sequence.
    stem = stem.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip(". ")
    return (stem or "attachment") + ext


def msgtype_for(content_type: str) -> str:
    """The Matrix msgtype for an attachment of this (lowercase) content type."""
    major = content_type.partition("/")[0]
    if content_type == "image/svg+xml":
        # SVG can carry script; clients do not render it inline, so it is a plain file.
        return "m.file"
    return {"image": "m.image", "video": "m.video", "audio": "m.audio"}.get(major, "m.file")


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the image's header, or None if unknown. Sniffs, never raises."""
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            size = _png(data)
        elif data[:6] in (b"GIF87a", b"GIF89a"):
            size = _gif(data)
        elif data.startswith(b"\xff\xd8"):
            size = _jpeg(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            size = _webp(data)
        else:
            size = None
    except (struct.error, IndexError, ValueError):
        return None
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _png(data: bytes) -> tuple[int, int] | None:
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _gif(data: bytes) -> tuple[int, int]:
    width, height = struct.unpack("<HH", data[6:10])
    return width, height


# SOF0-SOF15 without DHT (C4), JPG (C8) and DAC (CC), which share the range but carry no size.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers that stand alone, without a length field.
_STANDALONE = frozenset(range(0xD0, 0xDA)) | {0x01}


def _jpeg(data: bytes) -> tuple[int, int] | None:
    pos = 2
    # Each step jumps a whole segment, so a bounded number of steps covers large EXIF blocks.
    for _ in range(1000):
        while pos < len(data) and data[pos] != 0xFF:
            pos += 1  # tolerate garbage between segments, as decoders do
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1  # fill bytes
        if pos >= len(data):
            return None
        marker = data[pos]
        pos += 1
        if marker in _STANDALONE:
            continue
        if marker == 0xDA:  # start of scan: entropy-coded data follows, no frame header seen
            return None
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return width, height
        if length < 2:
            return None
        pos += length
    return None


def _webp(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        # Key frame: 3-byte frame tag, start code 9d 01 2a, then 14-bit width and height.
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        b0, b1, b2, b3 = data[21:25]
        width = 1 + (b0 | (b1 & 0x3F) << 8)
        height = 1 + (b1 >> 6 | b2 << 2 | (b3 & 0x0F) << 10)
        return width, height
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
        return width, height
    return None
