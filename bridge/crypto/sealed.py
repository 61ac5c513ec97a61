"""Secrets at rest: small values sealed with a key derived from encryption.pickle_key.

The bridge keeps a few secrets in its database (e.g. the bot's cross-signing recovery key). Sealing
them means a copy of the database alone — a backup, a dump — does not reveal them.
"""

from __future__ import annotations

import base64
import hashlib

from Crypto.Cipher import AES
from Crypto.Random import get_random_bytes

_VERSION = "v1"


class UnsealError(Exception):
    pass


def _key(pickle_key: str, purpose: str) -> bytes:
    # Domain-separated so the same pickle key never yields the same AES key for two purposes.
    return hashlib.sha256(f"cloakroom-seal:{purpose}:{pickle_key}".encode()).digest()


def seal(pickle_key: str, purpose: str, plaintext: str) -> str:
    nonce = get_random_bytes(12)
    cipher = AES.new(_key(pickle_key, purpose), AES.MODE_GCM, nonce=nonce)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext.encode())
    return f"{_VERSION}:" + base64.b64encode(nonce + tag + ciphertext).decode()


def unseal(pickle_key: str, purpose: str, sealed: str) -> str:
    version, _, payload = sealed.partition(":")
    if version != _VERSION:
        raise UnsealError(f"unknown sealed format {version!r}")
    raw = base64.b64decode(payload)
    nonce, tag, ciphertext = raw[:12], raw[12:28], raw[28:]
    cipher = AES.new(_key(pickle_key, purpose), AES.MODE_GCM, nonce=nonce)
    try:
        return cipher.decrypt_and_verify(ciphertext, tag).decode()
    except ValueError:
        raise UnsealError("wrong key or tampered value") from None


# Binary values (queued raw mail, composed outgoing mail) are sealed without base64: they live in
# BLOB/BYTEA columns and can be megabytes. The marker lets rows written before sealing existed
# (plain RFC 5322 text, which can never start with a NUL byte) still be read.
_BYTES_MARKER = b"\x00CRS1"


def is_sealed_bytes(blob: bytes) -> bool:
    return blob.startswith(_BYTES_MARKER)


def seal_bytes(pickle_key: str, purpose: str, data: bytes) -> bytes:
    nonce = get_random_bytes(12)
    cipher = AES.new(_key(pickle_key, purpose), AES.MODE_GCM, nonce=nonce)
    ciphertext, tag = cipher.encrypt_and_digest(data)
    return _BYTES_MARKER + nonce + tag + ciphertext


def unseal_bytes(pickle_key: str, purpose: str, blob: bytes) -> bytes:
    """The plaintext of a sealed blob; a blob from before sealing is returned as it is."""
    blob = bytes(blob)
    if not is_sealed_bytes(blob):
        return blob
    raw = blob[len(_BYTES_MARKER) :]
    nonce, tag, ciphertext = raw[:12], raw[12:28], raw[28:]
    cipher = AES.new(_key(pickle_key, purpose), AES.MODE_GCM, nonce=nonce)
    try:
        return cipher.decrypt_and_verify(ciphertext, tag)
    except ValueError:
        raise UnsealError("wrong key or tampered value") from None
