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
