"""End-to-end encryption: identities the bridge owns and the encrypted sender."""

from __future__ import annotations

from .account import CryptoAccount, CryptoSetupError
from .identities import Identities
from .sender import EncryptedSender, NoReadableDevice, PlaintextRefused

__all__ = [
    "CryptoAccount",
    "CryptoSetupError",
    "EncryptedSender",
    "Identities",
    "NoReadableDevice",
    "PlaintextRefused",
]
