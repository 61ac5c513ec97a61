"""Command line: ``python -m bridge`` (or ``cloakroom``).

Exit codes (bridge.exitcodes): 0 ok, 1 unexpected failure, 2 bad arguments, 10 configuration
error, 11 registration file exists, 12 registration cannot be written there, 20 encryption set-up
failed, 21 database error, 30 (check-config) a service did not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging.config
import os
import sys
from collections.abc import Sequence

from . import __version__
from .config import (
    GENERATED_KEYS,
    PLACEHOLDER,
    Config,
    ConfigError,
    generate_secrets,
    load_for_registration,
    problems_of,
    write_values,
)
from .exitcodes import (
    EXIT_CONFIG,
    EXIT_CRYPTO,
    EXIT_FAILURE,
    EXIT_REGISTRATION_EXISTS,
    EXIT_REGISTRATION_PATH,
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="cloakroom", description="Cloakroom: email into end-to-end encrypted Matrix rooms."
    )
    parser.add_argument("-c", "--config", default="config.yaml", help="config file to read")
    parser.add_argument(
        "-g",
        "--generate-registration",
        action="store_true",
        help="write the appservice registration (with fresh tokens, also saved to the config)",
    )
    parser.add_argument(
        "-r", "--registration", default="registration.yaml", help="registration file to write"
    )
    parser.add_argument(
        "--force", action="store_true", help="with -g: overwrite an existing registration file"
    )
    parser.add_argument("--version", action="version", version=f"Cloakroom {__version__}")
    sub = parser.add_subparsers(dest="command")
    keygen = sub.add_parser(
        "dkim-keygen", help="create a DKIM key, print the DNS record, and set it in the config"
    )
    keygen.add_argument("--selector", default="cloakroom", help="DKIM selector (default cloakroom)")
    keygen.add_argument("--key", default="dkim.pem", help="where to write the private key")
    check = sub.add_parser(
        "check-config",
        help="report every problem of the config, then whether the homeserver, the database "
        "and the relay answer",
    )
    # Accepted after the command too; SUPPRESS keeps the -c given before it.
    check.add_argument("-c", "--config", default=argparse.SUPPRESS, help="config file to check")
    return parser.parse_args(argv)


def _fail(code: int, message: str) -> int:
    print(f"cloakroom: {message}", file=sys.stderr)
    return code


def _config_failure(path: str, error: ConfigError) -> int:
    """One line for one problem; a count, then a line each, for several."""
    problems = problems_of(error)
    if len(problems) == 1:
        return _fail(EXIT_CONFIG, f"config error in {path}: {error}")
    lines = "".join(f"\n  {problem}" for problem in problems)
    return _fail(EXIT_CONFIG, f"{len(problems)} problems in {path}, fix each of them:{lines}")


def generate_registration(args: argparse.Namespace) -> int:
    from . import registration

    try:
        config = load_for_registration(args.config, os.environ)
    except ConfigError as e:
        return _config_failure(args.config, e)
    for key in ("APPSERVICE__AS_TOKEN", "APPSERVICE__HS_TOKEN"):
        if f"CLOAKROOM_{key}" in os.environ:
            # The fresh tokens go to the file, but the environment would win at run time.
            return _fail(
                EXIT_CONFIG,
                f"CLOAKROOM_{key} is set; unset it before generating a registration, "
                "or the bridge would run with a token the homeserver does not know",
            )
    for path in (args.registration, args.config):
        # Checked before anything is written: a registration without the config that matches it
        # (or the reverse) would leave tokens the other side does not know.
        problem = registration.path_problem(path)
        if problem:
            return _fail(EXIT_REGISTRATION_PATH, problem)
    if os.path.exists(args.registration) and not args.force:
        return _fail(
            EXIT_REGISTRATION_EXISTS,
            f"{args.registration} already exists; pass --force to replace it "
            "(the homeserver must then load the new tokens)",
        )
    new = generate_secrets()
    values = {"appservice.as_token": new["appservice.as_token"]}
    values["appservice.hs_token"] = new["appservice.hs_token"]
    # A pickle key encrypts existing keys: generate it once, never replace it.
    if str(config["encryption.pickle_key"]).startswith(PLACEHOLDER.replace(" ", "-")):
        values["encryption.pickle_key"] = new["encryption.pickle_key"]
    assert set(values) <= set(GENERATED_KEYS)
    reg = registration.build(config, values["appservice.as_token"], values["appservice.hs_token"])
    try:
        registration.write(args.registration, reg, force=True)
    except registration.RegistrationPathError as e:
        return _fail(EXIT_REGISTRATION_PATH, str(e))
    try:
        write_values(args.config, values)
    except OSError as e:
        return _fail(
            EXIT_REGISTRATION_PATH,
            f"wrote {args.registration} but cannot save its tokens in {args.config} "
            f"({e.strerror or e}); make it writable and run -g --force again",
        )
    print(f"Wrote {args.registration} and saved its tokens in {args.config}.")
    print("Add it to homeserver.yaml under app_service_config_files and restart the homeserver.")
    return 0


def run_bridge(args: argparse.Namespace) -> int:
    from . import sqlite_pool
    from .app import Cloakroom, StartupError
    from .crypto import CryptoSetupError

    # A database that cannot be opened must end start-up with its one sentence: no thread left
    # behind to write to a closed loop or to keep the process alive (see bridge.sqlite_pool).
    sqlite_pool.register()

    try:
        config = Config.load(args.config)
    except ConfigError as e:
        return _config_failure(args.config, e)
    try:
        logging.config.dictConfig(config["logging"])
    except (ValueError, TypeError, AttributeError, ImportError) as e:
        return _fail(EXIT_CONFIG, f"config error in {args.config}: logging: {e}")
    log = logging.getLogger("bridge")
    for warning in config.warnings:
        log.warning("Config: %s", warning)
    try:
        asyncio.run(Cloakroom(config).run())
    except CryptoSetupError as e:
        log.critical("Encryption set-up failed: %s", e)
        return EXIT_CRYPTO
    except StartupError as e:
        log.critical("%s", e)
        return e.exit_code
    except ConfigError as e:
        log.critical("Config error in %s: %s", args.config, e)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    except Exception:
        log.critical("Cloakroom stopped because of an unexpected error", exc_info=True)
        return EXIT_FAILURE
    return 0


def dkim_keygen(args: argparse.Namespace) -> int:
    from .email.dkimsign import dns_record, dns_record_text, generate_key

    try:
        config = load_for_registration(args.config, os.environ)
    except ConfigError as e:
        return _config_failure(args.config, e)
    try:
        pem = generate_key(args.key)
    except FileExistsError:
        return _fail(EXIT_FAILURE, f"{args.key} already exists; choose another --key path")
    key_path = os.path.abspath(args.key)
    write_values(args.config, {"email.dkim.selector": args.selector,
                               "email.dkim.private_key": key_path})
    print(f"Wrote the private key to {key_path} and set email.dkim in {args.config}.")
    print("Publish this TXT record, then restart the bridge:\n")
    print(dns_record_text(args.selector, config.email_domain, dns_record(pem)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "dkim-keygen":
        return dkim_keygen(args)
    if args.command == "check-config":
        from .checkconfig import check_config

        return check_config(args.config)
    if args.generate_registration:
        return generate_registration(args)
    return run_bridge(args)


if __name__ == "__main__":
    sys.exit(main())
