"""Sender authentication for inbound mail: SPF, DKIM and DMARC, or a trusted MTA's results."""

from __future__ import annotations

from .dns import DnsTempError, Resolver
from .verdict import AuthConfig, Authenticator, AuthVerdict

__all__ = ["AuthConfig", "AuthVerdict", "Authenticator", "DnsTempError", "Resolver"]
