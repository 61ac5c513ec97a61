"""`python -m bridge -g`: the registration file for Synapse and the tokens saved in the config."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge import registration
from bridge.__main__ import EXIT_CONFIG, EXIT_REGISTRATION_EXISTS, main
from bridge.config import PLACEHOLDER, Config, sample_text

GENERATE = ["-c", "config.yaml", "-g", "-r", "registration.yaml"]


def sample_config(**replace: str) -> str:
    """The sample with the homeserver set, as an admin has it before the first -g."""
    text = sample_text().replace("https://matrix.example.com", "http://localhost:8008")
    text = text.replace("domain: example.com", "domain: localhost")
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    return text


@pytest.fixture
def workdir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("CLOAKROOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(sample_config())
    return tmp_path


def read(path: Path) -> dict[str, Any]:
    return YAML(typ="safe").load(path.read_text())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_generate_writes_the_registration(workdir: Path) -> None:
    assert main(GENERATE) == 0
    reg = read(workdir / "registration.yaml")
    config = read(workdir / "config.yaml")
    assert reg["id"] == "cloakroom"
    assert reg["url"] == "http://localhost:29400"
    assert reg["sender_localpart"] == "cloakroom"
    assert reg["as_token"] == config["appservice"]["as_token"]
    assert reg["hs_token"] == config["appservice"]["hs_token"]
    assert reg["as_token"] != reg["hs_token"]
    assert len(reg["as_token"]) >= 32 and PLACEHOLDER not in reg["as_token"]
    assert reg["rate_limited"] is False
    for flag in (
        "receive_ephemeral",
        "de.sorunome.msc2409.push_ephemeral",
        "org.matrix.msc3202",
        "io.element.msc4190",
    ):
        assert reg[flag] is True, flag
    users = reg["namespaces"]["users"]
    assert all(ns["exclusive"] is True for ns in users)
    assert re.fullmatch(users[0]["regex"], "@cloakroom:localhost")
    assert re.fullmatch(users[1]["regex"], "@_email_alice=40example.com:localhost")
    assert mode(workdir / "registration.yaml") == 0o600
    assert mode(workdir / "config.yaml") == 0o600


def test_generate_keeps_config_comments_and_leaves_a_loadable_config(workdir: Path) -> None:
    assert main(GENERATE) == 0
    text = (workdir / "config.yaml").read_text()
    comments = [line for line in sample_text().splitlines() if line.lstrip().startswith("#")]
    assert [line for line in text.splitlines() if line.lstrip().startswith("#")] == comments
    assert PLACEHOLDER not in text
    config = Config.load(workdir / "config.yaml", env={})
    assert len(config["encryption.pickle_key"]) >= 32


def test_force_regenerates_tokens_but_keeps_the_pickle_key(workdir: Path) -> None:
    assert main(GENERATE) == 0
    first = read(workdir / "config.yaml")
    assert main([*GENERATE, "--force"]) == 0
    second = read(workdir / "config.yaml")
    reg = read(workdir / "registration.yaml")
    assert second["encryption"]["pickle_key"] == first["encryption"]["pickle_key"]
    for token in ("as_token", "hs_token"):
        assert second["appservice"][token] != first["appservice"][token]
        assert reg[token] == second["appservice"][token]


@pytest.mark.parametrize(
    ("old", "new", "kept"),
    [
        # An admin's own pickle key is never replaced.
        ('pickle_key: "This value is generated when generating the registration"',
         "pickle_key: my-own-key", "my-own-key"),
        # Emptied values are generated like the placeholder.
        ('pickle_key: "This value is generated when generating the registration"',
         'pickle_key: ""', None),
        ('as_token: "This value is generated when generating the registration"',
         "as_token:", None),
        # `encryption:` with nothing under it: the section is filled in.
        ("\n    pickle_key:", "\n    # pickle_key:", None),
    ],
)  # fmt: skip
def test_generate_pickle_key_and_empty_values(
    workdir: Path, old: str, new: str, kept: str | None
) -> None:
    (workdir / "config.yaml").write_text(sample_config(**{old: new}))
    assert main(GENERATE) == 0
    config = Config.load(workdir / "config.yaml", env={})
    if kept is not None:
        assert config["encryption.pickle_key"] == kept
    assert len(config["appservice.as_token"]) >= 32
    assert read(workdir / "registration.yaml")["as_token"] == config["appservice.as_token"]


def test_refuses_to_overwrite_without_force(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = workdir / "registration.yaml"
    existing.write_text("keep me\n")
    before = (workdir / "config.yaml").read_text()
    assert main(GENERATE) == EXIT_REGISTRATION_EXISTS
    assert existing.read_text() == "keep me\n"
    assert (workdir / "config.yaml").read_text() == before  # no tokens the homeserver lacks
    assert "--force" in capsys.readouterr().err
    assert main([*GENERATE, "--force"]) == 0
    assert read(existing)["id"] == "cloakroom"


@pytest.mark.parametrize(
    ("replace", "key"),
    [
        ({"domain: localhost": "domain: example.com"}, "homeserver.domain"),
        ({"database: sqlite:cloakroom.db": "database: mysql://u@h/db"}, "database"),
        ({"    port: 29400\n": "    port: abc\n"}, "appservice.port"),
        ({"encryption:\n": "encryption: 5\n"}, "encryption"),
    ],
)
def test_generate_with_bad_config_exits_10(
    workdir: Path, capsys: pytest.CaptureFixture[str], replace: dict[str, str], key: str
) -> None:
    text = sample_config(**replace)
    if "encryption: 5\n" in text:
        # A number where the section was: its keys go too (whatever keys the sample has now).
        text = re.sub(r"(?m)^(encryption: 5\n)(?:(?: .*)?\n)*", r"\1\n", text)
    (workdir / "config.yaml").write_text(text)
    assert main(GENERATE) == EXIT_CONFIG
    assert key in capsys.readouterr().err
    assert not (workdir / "registration.yaml").exists()


def test_write_refuses_then_forces_and_ignores_a_stale_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "registration.yaml"
    path.write_text("old\n")
    with pytest.raises(registration.RegistrationExists):
        registration.write(path, {"id": "x"}, force=False)
    assert path.read_text() == "old\n"
    stale = tmp_path / ".registration.yaml.tmp"
    stale.write_text("junk")
    stale.chmod(0o644)
    registration.write(path, {"id": "x"}, force=True)
    assert read(path) == {"id": "x"}
    assert mode(path) == 0o600 and not stale.exists()


@pytest.mark.parametrize(
    ("template", "domain", "user_id", "matches"),
    [
        ("_email_{address}", "localhost", "@_email_alice=40example.com:localhost", True),
        ("_email_{address}", "localhost", "@alice:localhost", False),
        ("_email_{address}", "localhost", "@_email_x:other.org", False),
        ("_email_{address}", "localhost", "@_email_:localhost", False),  # no address
        ("_email_{address}", "local.host", "@_email_x:localXhost", False),  # "." is escaped
        ("mail_{address}_bot", "localhost", "@mail_bob=40example.org_bot:localhost", True),
        ("mail_{address}_bot", "localhost", "@mail_bob=40example.org:localhost", False),
        ("e.mail+{address}", "localhost", "@e.mail+bob:localhost", True),
        ("e.mail+{address}", "localhost", "@eXmaillbob:localhost", False),
    ],
)
def test_ghost_regex(template: str, domain: str, user_id: str, matches: bool) -> None:
    regex = registration.user_regex(template, domain)
    # Synapse anchors the namespace regex at the start only (re.match).
    assert (re.match(regex, user_id) is not None) is matches


def test_build_uses_the_config() -> None:
    text = sample_config(
        **{
            "_email_{address}": "mail_{address}_bot",
            "bot_username: cloakroom": "bot_username: mailbot",
            "id: cloakroom": "id: my-bridge",
        }
    ).replace(f'"{PLACEHOLDER} when generating the registration"', "x")
    reg = registration.build(Config.from_text(text, env={}), "AS", "HS")
    assert (reg["id"], reg["sender_localpart"]) == ("my-bridge", "mailbot")
    assert (reg["as_token"], reg["hs_token"]) == ("AS", "HS")
    bot, ghosts = (ns["regex"] for ns in reg["namespaces"]["users"])
    assert re.fullmatch(bot, "@mailbot:localhost") and not re.match(bot, "@cloakroom:localhost")
    assert re.fullmatch(ghosts, "@mail_a=40b.c_bot:localhost")
    assert not re.match(ghosts, "@mailbot:localhost")


def test_committed_example_registration_matches_the_generator() -> None:
    """The registration.yaml in the repository is what -g writes for the sample config."""
    from bridge.config import Config, sample_text

    root = Path(__file__).parent.parent
    example = YAML(typ="safe").load((root / "registration.yaml").read_text())
    config = Config(YAML(typ="safe").load(sample_text()))
    expected = registration.build(config, example["as_token"], example["hs_token"])
    assert example == expected
    assert "generated" in example["as_token"], "real tokens must never be committed"


def test_dkim_keygen_writes_a_key_sets_the_config_and_prints_the_record(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-c", "config.yaml", "dkim-keygen", "--selector", "s1", "--key", "k.pem"]) == 0
    out = capsys.readouterr().out
    assert "s1._domainkey.localhost. IN TXT" in out and "p=" in out
    assert mode(workdir / "k.pem") == 0o600
    dkim = read(workdir / "config.yaml")["email"]["dkim"]
    assert dkim == {"selector": "s1", "private_key": str(workdir / "k.pem")}
    # A second run must not replace the key that the published record belongs to.
    assert main(["-c", "config.yaml", "dkim-keygen", "--key", "k.pem"]) != 0
