"""Process exit codes, so scripts and service managers can tell failures apart."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 10
EXIT_REGISTRATION_EXISTS = 11
# -g cannot write the registration (or the config) where it was asked to.
EXIT_REGISTRATION_PATH = 12
EXIT_CRYPTO = 20
EXIT_DATABASE = 21
# check-config: the configuration is valid, but a service it names did not answer as it should.
EXIT_SERVICE = 30
