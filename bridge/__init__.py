"""Cloakroom: a Matrix appservice that bridges email into end-to-end encrypted rooms."""

__version__ = "0.1.0"
