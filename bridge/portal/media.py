"""Encrypted media: attachments are uploaded as ciphertext, never as plaintext."""

from __future__ import annotations

from typing import Any

from mautrix.appservice import IntentAPI
from mautrix.crypto.attachments import async_inplace_encrypt_attachment


async def upload_encrypted(
    intent: IntentAPI,
    data: bytes,
    *,
    msgtype: str,
    filename: str,
    content_type: str,
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Any]:
    """Encrypt (AES-CTR, the spec's `file` object), upload, and build the media event content.

    The homeserver only ever sees ciphertext with a neutral content type; the real type, name
    and size travel inside the (Megolm-encrypted) event.
    """
    buffer = bytearray(data)
    size = len(buffer)
    encrypted = await async_inplace_encrypt_attachment(buffer)
    encrypted.url = await intent.upload_media(
        buffer, mime_type="application/octet-stream", size=size
    )
    info: dict[str, Any] = {"mimetype": content_type, "size": size}
    if msgtype == "m.image" and width and height:
        info["w"] = width
        info["h"] = height
    return {
        "msgtype": msgtype,
        "body": filename,
        "filename": filename,
        "info": info,
        "file": encrypted.serialize(),
    }
