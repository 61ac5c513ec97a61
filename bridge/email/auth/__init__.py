"""Sender authentication for inbound mail: SPF, DKIM and DMARC, or a trusted MTA's results."""

from __future__ import annotations

from .dns import DnsTempError, Resolver
from .headers import HeaderSection, read_header_section
from .verdict import AuthConfig, Authenticator, AuthVerdict

__all__ = [
    "AuthConfig",
    "AuthVerdict",
    "Authenticator",
    "DnsTempError",
    "HeaderSection",
    "Resolver",
    "read_header_section",
]
