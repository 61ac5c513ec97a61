"""The hub: one conversation ↔ one encrypted room. Email in and Matrix in both meet here."""

from __future__ import annotations

from ..crypto import NoReadableDevice
from .ghosts import Ghosts
from .portal import MailJob, PortalManager
from .store import GhostStore, MessageMap, PortalStore

__all__ = [
    "GhostStore",
    "Ghosts",
    "MailJob",
    "MessageMap",
    "NoReadableDevice",
    "PortalManager",
    "PortalStore",
]
