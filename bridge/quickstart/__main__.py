"""`make run`: a local Synapse with Cloakroom attached, and a demo user to log in with.

Everything lives in one state directory (`.cloakroom/` by default); a second run reuses it.
Ctrl-C stops the bridge, then Synapse.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from ..__main__ import main as bridge_main
from ..config import ConfigError, load_for_registration, sample_text, write_values
from ..exitcodes import EXIT_CONFIG, EXIT_REGISTRATION_PATH
from ..registration import build as build_registration
from .sink import MailSink
from .synapse import LocalSynapse, SynapseError, errcode

DEMO_USER = "demo"


class QuickstartError(Exception):
    """The state directory is in a shape the quickstart cannot repair by itself."""

    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bridge.quickstart", description=__doc__)
    parser.add_argument("--dir", default=".cloakroom", help="state directory (default .cloakroom)")
    parser.add_argument("--hs-port", type=int, default=8008, help="Synapse port on 127.0.0.1")
    parser.add_argument("--as-port", type=int, default=29400, help="bridge port on 127.0.0.1")
    parser.add_argument("--smtp-port", type=int, default=2525, help="SMTP port on 127.0.0.1")
    parser.add_argument(
        "--sink-port", type=int, default=2526, help="port of the local sink outgoing mail goes to"
    )
    parser.add_argument(
        "--database", type=_database_arg, default=None, metavar="URL",
        help="the bridge database, e.g. postgres://user:password@host/dbname (default: SQLite "
        "in the state directory, or the PostgreSQL database an earlier --database named)",
    )
    return parser.parse_args(argv)


def _database_arg(value: str) -> str:
    if not value.startswith(("postgres://", "postgresql://", "sqlite:")):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a database URL; use postgres://user:password@host/dbname"
        )
    return value


def _database_url(config: Path, state: Path, requested: str | None) -> str:
    """The database to write into the config: the one asked for; else the PostgreSQL database an
    earlier run was given (a plain `make run` must not switch to an empty SQLite file, which
    would mean a new bot device and no mail history); else SQLite in the state directory."""
    if requested:
        return requested
    if config.is_file():
        with contextlib.suppress(YAMLError, OSError, UnicodeDecodeError, AttributeError):
            current = YAML(typ="safe").load(config.read_text("utf-8")).get("database")
            if isinstance(current, str) and current.startswith(("postgres://", "postgresql://")):
                return current
    return f"sqlite:{state / 'cloakroom.db'}"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As the servers themselves do: a port in TIME_WAIT after our last run is free to use.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _bridge_config(
    state: Path, hs_port: int, as_port: int, smtp_port: int, sink_port: int,
    database: str | None = None,
) -> Path:
    """The bridge config: made (with -g) on the first run; the quickstart's own keys are set
    on every run, so a state directory from an older version picks up new ones."""
    config = state / "config.yaml"
    registration = state / "registration.yaml"
    if config.is_dir():
        raise QuickstartError(
            EXIT_CONFIG, f"{config} is a directory; remove it and the quickstart writes a config"
        )
    if registration.is_dir():
        raise QuickstartError(
            EXIT_REGISTRATION_PATH,
            f"{registration} is a directory; remove it and the quickstart writes a registration",
        )
    database_url = _database_url(config, state, database)
    fresh = not config.exists()
    if fresh:
        config.write_text(sample_text())
    write_values(
        config,
        {
            "homeserver.address": f"http://127.0.0.1:{hs_port}",
            "homeserver.domain": "localhost",
            "appservice.address": f"http://127.0.0.1:{as_port}",
            "appservice.port": as_port,
            "database": database_url,
            "email.listen.host": "127.0.0.1",
            "email.listen.port": smtp_port,
            # No real relay here: outgoing mail lands in .cloakroom/sent/ instead.
            "email.relay.host": "127.0.0.1",
            "email.relay.port": sink_port,
            "email.relay.security": "none",
            # The encryption guard: private rooms of local users get encrypted.
            "onboarding.guard": "private",
        },
    )
    if fresh or _registration_outdated(config, registration):
        # A state directory from an older version lacks the guard's namespace: a new
        # registration (fresh tokens too) is fine, since Synapse is only started after this.
        # Forced when the config is new too: a registration left from before holds tokens the new
        # config does not.
        code = bridge_main(["-c", str(config), "-g", "-r", str(registration), "--force"])
        if code:
            raise SystemExit(code)
    return config


def _registration_outdated(config: Path, registration: Path) -> bool:
    """Whether the registration lacks a user namespace the config now needs."""
    if not registration.exists():
        return True
    wanted = build_registration(load_for_registration(str(config), os.environ), "", "")
    try:
        have = YAML(typ="safe").load(registration.read_text("utf-8"))
        have_users = have["namespaces"]["users"]
        return any(ns not in have_users for ns in wanted["namespaces"]["users"])
    except (YAMLError, OSError, UnicodeDecodeError, TypeError, KeyError):
        # Ours to write (Synapse reads it only after this): a broken one is simply replaced.
        print(f"{registration} is not a valid registration; writing a new one.", file=sys.stderr)
        return True


def _demo_account(state: Path, synapse: LocalSynapse, smtp_port: int) -> dict[str, Any]:
    """The demo user (created once) and the facts `make run` prints."""
    facts_path = state / "quickstart.json"
    facts = _read_facts(facts_path)
    if not isinstance(facts.get("password"), str):
        facts["password"] = _new_demo_password(synapse, facts_path)
    facts.update(
        homeserver=synapse.url,
        user_id=f"@{DEMO_USER}:{synapse.server_name}",
        bot=f"@cloakroom:{synapse.server_name}",
        smtp={"host": "127.0.0.1", "port": smtp_port},
        mailbox=f"{DEMO_USER}@{synapse.server_name}",
        sent=str(state / "sent"),
    )
    fd = os.open(facts_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(facts, f, indent=2)
    return facts


def _read_facts(path: Path) -> dict[str, Any]:
    """What an earlier run saved; nothing when the file is missing or unreadable."""
    try:
        facts = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        print(f"{path} is unreadable; writing a new one.", file=sys.stderr)
        return {}
    return facts if isinstance(facts, dict) else {}


def _new_demo_password(synapse: LocalSynapse, facts_path: Path) -> str:
    """Create the demo user with a new password, or, if it exists (its password was in a
    quickstart.json that is gone), give it a new one; its devices and rooms stay."""
    password = secrets.token_urlsafe(12)
    try:
        synapse.register_user(DEMO_USER, password)
    except urllib.error.HTTPError as e:
        if errcode(e) != "M_USER_IN_USE":
            raise
        synapse.set_password(DEMO_USER, password)
        print(f"{facts_path} was missing, so the existing demo user got a new password.",
              file=sys.stderr)
    return password


def _start_bridge(config: Path, as_port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bridge", "-c", str(config)],
            cwd=config.parent,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"The bridge exited with {proc.returncode}; see {log_path}")
        try:
            url = f"http://127.0.0.1:{as_port}/_matrix/mau/ready"
            with urllib.request.urlopen(url, timeout=2):
                return proc
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit(f"The bridge did not become ready within 60 s; see {log_path}")


def _print_welcome(facts: dict[str, Any], state: Path) -> None:
    print(
        f"""
Cloakroom is running.

  Homeserver:  {facts['homeserver']}
  User:        {facts['user_id']}
  Password:    {facts['password']}
  Bridge bot:  {facts['bot']}
  Mailbox:     {facts['mailbox']} (SMTP on {facts['smtp']['host']}:{facts['smtp']['port']})
  Sent mail:   {facts['sent']} (what you write in a conversation room, as .eml files)

Log in with Element (Desktop, or Element Web in a browser on this machine): choose
"Sign in", edit the homeserver to {facts['homeserver']}, and use the user and password above.
Then start a direct chat with {facts['bot']} and send "help".
Send mail to {facts['mailbox']} through {facts['smtp']['host']}:{facts['smtp']['port']}, e.g.
  swaks --server {facts['smtp']['host']}:{facts['smtp']['port']} --to {facts['mailbox']}
and it arrives in an encrypted room, from a user standing for the sender.

These facts are also in {state / 'quickstart.json'}.
Logs: {state / 'bridge.log'} and {state / 'synapse' / 'homeserver.log'}.
Press Ctrl-C to stop.
""",
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    state = Path(args.dir).resolve()
    state.mkdir(mode=0o700, exist_ok=True)
    for port in (args.hs_port, args.as_port, args.smtp_port, args.sink_port):
        if not _port_free(port):
            print(f"Port {port} on 127.0.0.1 is in use; stop what uses it or pick another "
                  "with --hs-port/--as-port/--smtp-port/--sink-port.", file=sys.stderr)
            return 1
    try:
        config = _bridge_config(state, args.hs_port, args.as_port, args.smtp_port,
                                args.sink_port, args.database)
    except QuickstartError as e:
        print(e, file=sys.stderr)
        return e.exit_code
    except ConfigError as e:
        print(f"config error in {state / 'config.yaml'}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    sink = MailSink(state / "sent", args.sink_port)
    synapse = LocalSynapse(
        base_dir=state / "synapse",
        port=args.hs_port,
        registration_files=[state / "registration.yaml"],
        # Clients then create private rooms encrypted from the start; the guard covers the rest.
        extra_config={"encryption_enabled_by_default_for_room_type": "invite"},
    )
    stop = False

    def on_signal(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    bridge: subprocess.Popen[bytes] | None = None
    try:
        sink.start()
        synapse.prepare()
        synapse.start()
        bridge = _start_bridge(config, args.as_port, state / "bridge.log")
        _print_welcome(_demo_account(state, synapse, args.smtp_port), state)
        while not stop:
            if bridge.poll() is not None:
                print(f"The bridge exited with {bridge.returncode}; see {state / 'bridge.log'}",
                      file=sys.stderr)
                return 1
            if synapse.process is None or synapse.process.poll() is not None:
                print("Synapse exited; see its log.", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print("Stopping…", flush=True)
        return 0
    except SynapseError as e:
        print(e, file=sys.stderr)
        return 1
    except urllib.error.URLError as e:  # HTTPError too: setting up the demo user failed
        print(f"Synapse did not do what the quickstart asked ({e}); see {synapse.log_path}.",
              file=sys.stderr)
        return 1
    finally:
        if bridge is not None and bridge.poll() is None:
            bridge.send_signal(signal.SIGTERM)
            try:
                bridge.wait(30)
            except subprocess.TimeoutExpired:
                bridge.kill()
        synapse.stop()
        sink.stop()


if __name__ == "__main__":
    sys.exit(main())
