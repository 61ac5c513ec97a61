"""Attachment metadata without I/O: safe filenames, msgtypes and image dimensions from headers."""

from __future__ import annotations

import struct
import zlib

import pytest

from bridge.formatter.media import image_dimensions, msgtype_for, sanitize_filename

# --- tiny, valid images (also used by test_formatter.py) ----------------------------------------


def png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\x00\x00\x00" * width for _ in range(height))
    signature = b"\x89PNG\r\n\x1a\n"
    return (
        signature + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def gif(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0)  # 2-colour global table
    table = b"\x00\x00\x00\xff\xff\xff"
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + table + image + b"\x02\x02\x44\x01\x00" + b"\x3b"


def jpeg(width: int, height: int, sof: int = 0xC0) -> bytes:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    # An EXIF-sized APP1 segment before the frame header, which the reader must jump over.
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 300) + b"Exif\x00\x00" + b"\x00" * 294
    frame = struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + app1 + bytes([0xFF, sof]) + frame + b"\xff\xd9"


def webp_vp8x(width: int, height: int) -> bytes:
    payload = (
        b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    )
    chunk = b"VP8X" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8l(width: int, height: int) -> bytes:
    bits = (width - 1) | (height - 1) << 14
    payload = b"\x2f" + struct.pack("<I", bits)
    chunk = b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def webp_vp8(width: int, height: int) -> bytes:
    payload = b"\x00\x00\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\x00" * 4
    chunk = b"VP8 " + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


# --- media ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content_type", "expected"),
    [
        ("report.pdf", "application/pdf", "report.pdf"),
        ("../../etc/passwd", "application/octet-stream", "passwd"),
        ("C:\\Users\\bob\\report.pdf", "application/pdf", "report.pdf"),
        ("a\r\nBcc: x", "text/plain", "a Bcc x"),
        ("tab\there\x00nul\x7fdel.txt", "text/plain", "tab here nul del.txt"),
        (".bashrc", "text/plain", "bashrc"),
        ("...", "image/png", "image.png"),
        ("..", "image/jpeg", "image.jpg"),
        ("dir/", "application/pdf", "attachment.pdf"),
        ("", "application/octet-stream", "attachment.bin"),
        (None, "text/calendar", "invite.ics"),
        (None, "audio/ogg", "audio.ogg"),
        (None, "video/x-unknown", "video.bin"),
        ("Grüße   aus\u3000Köln.txt", "text/plain", "Grüße aus Köln.txt"),
        ("日本語のファイル.pdf", "application/pdf", "日本語のファイル.pdf"),
        # Right-to-left override would show "invoiceexe.png".
        ("invoice\u202egnp.exe", "application/octet-stream", "invoicegnp.exe"),
        ('what?<is>"this"|*.txt', "text/plain", "what is this .txt"),
        ("trailing dots. . .", "text/plain", "trailing dots"),
        ("x" * 300 + ".pdf", "application/pdf", "x" * 251 + ".pdf"),
        ("ü" * 200 + ".txt", "text/plain", "ü" * 125 + ".txt"),
        ("y" * 300, "application/octet-stream", "y" * 255),
    ],
)
def test_sanitize_filename(name: str | None, content_type: str, expected: str) -> None:
    result = sanitize_filename(name, content_type)
    assert result == expected
    assert len(result.encode("utf-8")) <= 255


@pytest.mark.parametrize(
    ("content_type", "msgtype"),
    [
        ("image/png", "m.image"),
        ("image/svg+xml", "m.file"),
        ("video/webm", "m.video"),
        ("audio/ogg", "m.audio"),
        ("application/pdf", "m.file"),
        ("text/plain", "m.file"),
    ],
)
def test_msgtype_for(content_type: str, msgtype: str) -> None:
    assert msgtype_for(content_type) == msgtype


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png(1, 1), (1, 1)),
        (png(70_000, 3), (70_000, 3)),
        (gif(65_535, 2), (65_535, 2)),
        (jpeg(1, 1, sof=0xC1), (1, 1)),
        (jpeg(8, 9, sof=0xCF), (8, 9)),
        # Fill bytes and a stand-alone marker (no length field) before the frame header.
        (b"\xff\xd8\xff\xff\xff\xd0" + jpeg(5, 6)[2:], (5, 6)),
        (webp_vp8x(16_777_216, 1), (16_777_216, 1)),
        (webp_vp8l(16_384, 16_384), (16_384, 16_384)),
    ],
)
def test_image_dimensions(data: bytes, size: tuple[int, int]) -> None:
    assert image_dimensions(data) == size


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x89PNG\r\n\x1a\n",
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR\x00\x00",
        b"GIF89a\x01",
        b"\xff\xd8",
        b"\xff\xd8\xff\xe0\x00\x00",  # a zero segment length would loop forever
        b"\xff\xd8\xff\xc0\x00\x11\x08",
        b"\xff\xd8" + b"\xff\xe1\xff\xff" * 100,
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00\x2f",
        b"RIFF\x00\x00\x00\x00WEBPVP8X\x00",
        png(0, 5),
    ],
)
def test_image_dimensions_of_truncated_or_invalid_data(data: bytes) -> None:
    assert image_dimensions(data) is None
