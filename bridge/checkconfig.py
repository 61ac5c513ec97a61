"""`python -m bridge check-config -c config.yaml`: is this config ready to run?

First every problem of the configuration at once (each naming its key), then whether the services
it names answer: the homeserver (and whether it accepts our as_token), the database (opened to
read its schema version, never upgraded or written) and the relay (connect and EHLO with the
configured security). One line each, "ok: …" or "problem: …", so an admin fixes everything in one
round instead of one start-up per mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import smtplib
import sqlite3
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yarl

from .config import Config, ConfigError, problems_of
from .exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_SERVICE

# Seconds to wait for the homeserver and the database (the relay has email.relay.timeout).
TIMEOUT = 10
VERSION_TABLE = "cloakroom_version"


class Problem(Exception):
    """A service check failed; the message is the sentence to print after "problem: "."""


def check_config(path: str, out: Callable[[str], None] = print) -> int:
    """Report on the config at ``path``; returns the exit code (0, EXIT_CONFIG, EXIT_SERVICE)."""
    try:
        config = Config.load(path)
    except ConfigError as e:
        return _config_problems(path, problems_of(e), out)
    problems = _component_problems(config)
    if problems:
        return _config_problems(path, problems, out)
    for warning in config.warnings:
        out(f"warning: {warning}")
    out(f"ok: {path} is a valid configuration")
    failed = False
    for name, check in (
        ("homeserver", _check_homeserver),
        ("database", _check_database),
        ("relay", _check_relay),
    ):
        try:
            out(f"ok: {check(config)}")
        except Problem as e:
            failed = True
            out(f"problem: {e}")
        except Exception as e:  # a check that broke must not hide the others' answers
            failed = True
            out(f"problem: {name}: the check itself failed ({type(e).__name__}: {e})")
    return EXIT_SERVICE if failed else EXIT_OK


def _config_problems(path: str, problems: list[ConfigError], out: Callable[[str], None]) -> int:
    for problem in problems:
        out(f"problem: {problem}")
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    out(f"{count} in {path}; the services are checked once the configuration is valid")
    return EXIT_CONFIG


def _component_problems(config: Config) -> list[ConfigError]:
    """What only start-up would find: the DKIM key file, the DNS servers."""
    from .email.auth.verdict import AuthConfig
    from .email.dkimsign import DkimKey

    found = []
    try:
        AuthConfig.from_config(config)
    except ConfigError as e:
        found.append(e)
    if config["email.dkim.private_key"]:
        try:
            DkimKey.load(
                config["email.dkim.private_key"], config["email.dkim.selector"], config.email_domain
            )
        except ConfigError as e:
            found.append(e)
    return found


def _get_json(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
        return json.loads(response.read())


def _matrix_error(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read() or b"{}")
        return f"{error.code} {body.get('errcode', '')} {body.get('error', '')}".strip()
    except (ValueError, AttributeError):
        return f"{error.code} {error.reason}"


def _check_homeserver(config: Config) -> str:
    address = config["homeserver.address"].rstrip("/")
    try:
        versions = _get_json(f"{address}/_matrix/client/versions").get("versions") or ["?"]
    except urllib.error.HTTPError as e:
        raise Problem(
            f"homeserver.address: {address} answered {_matrix_error(e)} to "
            "/_matrix/client/versions; is it the homeserver's client API?"
        ) from None
    except (urllib.error.URLError, OSError, ValueError, AttributeError) as e:
        reason = getattr(e, "reason", e)
        raise Problem(
            f"homeserver.address: {address} does not answer ({reason}); "
            "is the homeserver running, and is this its address?"
        ) from None
    bot = config.bot_mxid
    query = urllib.parse.urlencode({"user_id": bot})
    try:
        whoami = _get_json(
            f"{address}/_matrix/client/v3/account/whoami?{query}", config["appservice.as_token"]
        )
    except urllib.error.HTTPError as e:
        raise Problem(
            f"appservice.as_token: the homeserver at {address} does not accept it "
            f"({_matrix_error(e)}); add the registration to app_service_config_files in "
            "homeserver.yaml and restart the homeserver (after -g, the new one)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Problem(f"homeserver.address: {address} stopped answering ({e})") from None
    if whoami.get("user_id") != bot:
        raise Problem(
            f"appservice.as_token: the homeserver took it for {whoami.get('user_id')!r}, not "
            f"{bot}; are appservice.bot_username and the registration's sender_localpart equal?"
        )
    return (
        f"homeserver {address} answers (Matrix {versions[-1]}) and accepts "
        f"appservice.as_token for {bot}"
    )


def _redact(url: str) -> str:
    parsed = yarl.URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def _latest_schema() -> int:
    from .db.upgrade import upgrade_table

    return len(upgrade_table.upgrades)


def _schema_state(version: int | None) -> str:
    latest = _latest_schema()
    if version is None:
        return "no Cloakroom tables yet (the bridge creates them at its first start)"
    if version > latest:
        raise Problem(
            f"database: its schema version is {version}, newer than this Cloakroom knows "
            f"({latest}); run the Cloakroom version that wrote it, or a newer one"
        )
    if version < latest:
        return f"schema version {version}; the next start upgrades it to {latest}"
    return f"schema version {version}, up to date"


def _check_database(config: Config) -> str:
    url = config["database"]
    if url.split(":", 1)[0] in ("sqlite", "sqlite3"):
        return _check_sqlite(url, yarl.URL(url).path)
    try:
        version = asyncio.run(_postgres_version(url))
    except Exception as e:
        raise Problem(f"database: cannot open {_redact(url)} ({e})") from None
    return f"database {_redact(url)} opens, {_schema_state(version)}"


def _check_sqlite(url: str, path: str) -> str:
    file = Path(path)
    if not file.exists():
        parent = file.resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise Problem(
                f"database: {path} does not exist and its directory {parent} is not a writable "
                "directory, so the bridge cannot create it"
            )
        return f"database {url} does not exist yet; the bridge creates it at its first start"
    if file.is_dir():
        raise Problem(f"database: {path} is a directory; sqlite:PATH names the database file")
    # Read-only: checking must not create, upgrade or journal anything.
    uri = f"file:{urllib.parse.quote(str(file.resolve()))}?mode=ro"
    try:
        # closing(): sqlite3's own context manager ends a transaction but leaves it open.
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=TIMEOUT)) as conn:
            has_table = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (VERSION_TABLE,)
            ).fetchone()
            row = has_table and conn.execute(f"SELECT version FROM {VERSION_TABLE}").fetchone()
    except sqlite3.Error as e:
        raise Problem(f"database: cannot read {path} ({e}); is it the bridge's database?") from None
    return f"database {url} opens, {_schema_state(row[0] if row else None)}"


async def _postgres_version(url: str) -> int | None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=TIMEOUT)
    try:
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", VERSION_TABLE):
            return None
        return await conn.fetchval(f"SELECT version FROM {VERSION_TABLE} LIMIT 1")
    finally:
        await conn.close()


def _check_relay(config: Config) -> str:
    host = config["email.relay.host"]
    if not host:
        return "relay not checked: email.relay.host is empty, so mail written in Matrix is not sent"
    port, security = config["email.relay.port"], config["email.relay.security"]
    where = f"{host}:{port} ({security})"
    try:
        greeting = _smtp_session(config, host, port, security)
    except smtplib.SMTPAuthenticationError as e:
        said = e.smtp_error.decode(errors="replace")
        raise Problem(
            f"email.relay.password: the relay {where} refused the login of "
            f"{config['email.relay.username']!r} ({e.smtp_code} {said})"
        ) from None
    except (smtplib.SMTPException, OSError) as e:
        raise Problem(
            f"email.relay.host: the relay {where} does not answer as configured ({e})"
        ) from None
    return f"relay {where} answers: {greeting}"


def _smtp_session(config: Config, host: str, port: int, security: str) -> str:
    """Connect, EHLO, STARTTLS and log in as the bridge would; returns the EHLO greeting."""
    timeout = float(config["email.relay.timeout"])
    context = ssl.create_default_context()  # what aiosmtplib verifies with, too
    if security == "tls":
        smtp: smtplib.SMTP = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        smtp = smtplib.SMTP(host, port, timeout=timeout)
    with smtp:
        code, text = smtp.ehlo()
        if code != 250:
            raise smtplib.SMTPHeloError(code, text)
        if security == "starttls":
            if not smtp.has_extn("starttls"):
                raise smtplib.SMTPNotSupportedError("it does not offer STARTTLS")
            smtp.starttls(context=context)
            smtp.ehlo()
        if config["email.relay.username"]:
            smtp.login(config["email.relay.username"], config["email.relay.password"])
        return text.decode(errors="replace").splitlines()[0]


if __name__ == "__main__":
    sys.exit(check_config(sys.argv[1] if len(sys.argv) > 1 else "config.yaml"))
