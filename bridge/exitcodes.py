"""Process exit codes, so scripts and service managers can tell failures apart."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 10
EXIT_REGISTRATION_EXISTS = 11
EXIT_CRYPTO = 20
EXIT_DATABASE = 21
