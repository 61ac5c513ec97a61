"""`make run`'s program: a fresh Synapse and bridge, a demo user a real E2EE client can use."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from nio import AsyncClient, AsyncClientConfig, LoginResponse
from ruamel.yaml import YAML

from bridge.__main__ import main as bridge_main
from bridge.config import sample_text, write_values
from bridge.exitcodes import EXIT_CONFIG, EXIT_REGISTRATION_PATH
from bridge.quickstart.__main__ import _bridge_config
from bridge.quickstart.synapse import free_port

from .harness import (
    accept_invite,
    from_sender,
    open_dm_with_bot,
    send_text,
    sync_until,
    wait_for_event,
)
from .mail import make_mail, send, unique


def _start(state: Path, ports: tuple[int, ...]) -> tuple[subprocess.Popen[str], str]:
    hs_port, as_port, smtp_port, sink_port = ports
    proc = subprocess.Popen(
        [sys.executable, "-m", "bridge.quickstart", "--dir", str(state),
         "--hs-port", str(hs_port), "--as-port", str(as_port), "--smtp-port", str(smtp_port),
         "--sink-port", str(sink_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,  # no prompt may need an answer
        text=True,
    )
    assert proc.stdout is not None
    output = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:
        output.append(line)
        if "Press Ctrl-C to stop." in line:
            return proc, "".join(output)
        assert time.monotonic() < deadline, "".join(output)
    raise AssertionError(f"quickstart exited with {proc.wait()}:\n{''.join(output)}")


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


async def _login(facts: dict[str, Any], store: Path) -> AsyncClient:
    store.mkdir(parents=True, exist_ok=True)
    client = AsyncClient(
        facts["homeserver"], facts["user_id"], store_path=str(store),
        config=AsyncClientConfig(encryption_enabled=True, store_sync_tokens=True),
    )
    resp = await client.login(facts["password"], device_name="quickstart-test")
    assert isinstance(resp, LoginResponse), resp
    if client.should_upload_keys:
        await client.keys_upload()
    await client.sync(timeout=0, full_state=True)
    return client


async def test_quickstart_brings_up_a_bot_a_client_can_talk_to(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ports = hs_port, _, smtp_port, _ = free_port(), free_port(), free_port(), free_port()
    proc, output = await asyncio.to_thread(_start, state, ports)
    try:
        facts = json.loads((state / "quickstart.json").read_text())
        assert facts["homeserver"] == f"http://127.0.0.1:{hs_port}"
        assert facts["user_id"] == "@demo:localhost"
        assert facts["bot"] == "@cloakroom:localhost"
        assert facts["smtp"] == {"host": "127.0.0.1", "port": smtp_port}
        assert facts["mailbox"] == "demo@localhost"
        assert facts["password"] in output
        assert (state / "quickstart.json").stat().st_mode & 0o077 == 0

        client = await _login(facts, tmp_path / "nio")
        try:
            room_id = await open_dm_with_bot(client, facts["bot"])
            await send_text(client, room_id, "help")
            _, reply = await sync_until(client, from_sender(room_id, facts["bot"]))
            assert reply.decrypted
            assert "Cloakroom commands" in reply.body
            # The advertised mailbox really receives mail, offline (no DNS) included.
            token = unique("quickstart")
            await send(smtp_port, make_mail(to=facts["mailbox"], text=token), [facts["mailbox"]])
            portal = await accept_invite(client, inviter_prefix="@_email_")
            mail = await wait_for_event(client, portal, lambda e: token in getattr(e, "body", ""))
            assert mail.decrypted
            # An answer written in the room leaves as mail: here, into the sent folder.
            answer = unique("answer")
            await send_text(client, portal, answer)
            sent = Path(facts["sent"])
            for _ in range(60):
                files = [p for p in sent.glob("*.eml") if answer.encode() in p.read_bytes()]
                if files:
                    break
                await asyncio.sleep(0.5)
            assert files, "the answer did not leave as mail"
            assert b"X-Envelope-To: bob@example.org" in files[0].read_bytes()
        finally:
            await client.close()
    finally:
        code = await asyncio.to_thread(_stop, proc)
    assert code == 0, "Ctrl-C did not stop the quickstart cleanly"

    # A second run reuses the state: same account, nothing regenerated.
    # Private rooms encrypted from the start (the guard covers the rest), for the quickstart only.
    overrides = YAML(typ="safe").load((state / "synapse" / "overrides.yaml").read_text())
    assert overrides["encryption_enabled_by_default_for_room_type"] == "invite"
    config_before = (state / "config.yaml").read_text()
    proc, _ = await asyncio.to_thread(_start, state, ports)
    try:
        again = json.loads((state / "quickstart.json").read_text())
        assert again["password"] == facts["password"]
        assert (state / "config.yaml").read_text() == config_before
        client = await _login(again, tmp_path / "nio2")
        await client.close()
    finally:
        assert await asyncio.to_thread(_stop, proc) == 0


def test_quickstart_adds_the_guard_namespace_to_an_older_state_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state directory made before the guard: its registration is regenerated on the next run,
    with the guard's namespace and tokens that match the config."""
    for name in [n for n in os.environ if n.startswith("CLOAKROOM_")]:
        monkeypatch.delenv(name)
    state = tmp_path / "state"
    state.mkdir()
    config, registration = state / "config.yaml", state / "registration.yaml"
    config.write_text(sample_text())
    write_values(config, {"homeserver.address": "http://127.0.0.1:8008",
                          "homeserver.domain": "localhost", "onboarding.guard": "off"})
    assert bridge_main(["-c", str(config), "-g", "-r", str(registration)]) == 0
    guard_ns = {"regex": "@.*:localhost$", "exclusive": False}
    assert guard_ns not in YAML(typ="safe").load(registration.read_text())["namespaces"]["users"]

    _bridge_config(state, 8008, 29400, 2525, 2526)
    reg = YAML(typ="safe").load(registration.read_text())
    cfg = YAML(typ="safe").load(config.read_text())
    assert guard_ns in reg["namespaces"]["users"]
    assert cfg["onboarding"]["guard"] == "private"
    assert reg["as_token"] == cfg["appservice"]["as_token"]
    # Up to date now: the next run leaves both files alone.
    before = registration.read_text(), config.read_text()
    _bridge_config(state, 8008, 29400, 2525, 2526)
    assert (registration.read_text(), config.read_text()) == before


@pytest.mark.parametrize(
    ("name", "code", "what"),
    [
        ("registration.yaml", EXIT_REGISTRATION_PATH, "registration"),
        ("config.yaml", EXIT_CONFIG, "config"),
    ],
)
def test_quickstart_stops_at_a_directory_where_its_file_belongs(
    tmp_path: Path, name: str, code: int, what: str
) -> None:
    state = tmp_path / "state"
    (state / name).mkdir(parents=True)
    ports = [str(free_port()) for _ in range(4)]
    proc = subprocess.run(
        [sys.executable, "-m", "bridge.quickstart", "--dir", str(state),
         "--hs-port", ports[0], "--as-port", ports[1], "--smtp-port", ports[2],
         "--sink-port", ports[3]],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[0] == (
        f"{state / name} is a directory; remove it and the quickstart writes a {what}"
    )


async def test_quickstart_recovers_a_lost_password_and_a_broken_registration(
    tmp_path: Path,
) -> None:
    """quickstart.json deleted next to an existing demo account (its password is gone with it),
    and registration.yaml overwritten with garbage: the next run just works, with a new
    password for the same account."""
    state = tmp_path / "state"
    ports = tuple(free_port() for _ in range(4))
    proc, _ = await asyncio.to_thread(_start, state, ports)
    first = json.loads((state / "quickstart.json").read_text())
    assert await asyncio.to_thread(_stop, proc) == 0

    (state / "quickstart.json").unlink()
    (state / "registration.yaml").write_text("{{{ not: [a registration\n")
    proc, output = await asyncio.to_thread(_start, state, ports)
    try:
        assert "Traceback" not in output
        registration, facts = state / "registration.yaml", state / "quickstart.json"
        assert f"{registration} is not a valid registration; writing a new one." in output
        assert f"{facts} was missing, so the existing demo user got a new password." in output
        again = json.loads((state / "quickstart.json").read_text())
        assert again["user_id"] == first["user_id"]
        assert again["password"] != first["password"] and again["password"] in output
        client = await _login(again, tmp_path / "nio")
        try:
            # The bridge runs with the rewritten registration: the bot answers.
            room_id = await open_dm_with_bot(client, again["bot"])
            await send_text(client, room_id, "help")
            _, reply = await sync_until(client, from_sender(room_id, again["bot"]))
            assert "Cloakroom commands" in reply.body
        finally:
            await client.close()
    finally:
        assert await asyncio.to_thread(_stop, proc) == 0
