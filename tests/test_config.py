"""Loading, validating and rewriting the configuration, and the CLI's reaction to a bad one."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from bridge.__main__ import EXIT_CONFIG, main
from bridge.config import PLACEHOLDER, REQUIRED_KEYS, Config, ConfigError, sample_text, write_values

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PLACEHOLDER = f"{PLACEHOLDER} when generating the registration"
VALID = {
    "homeserver.address": "http://localhost:8008",
    "homeserver.domain": "localhost",
    "appservice.as_token": "as-secret",
    "appservice.hs_token": "hs-secret",
    "encryption.pickle_key": "pickle-secret",
}


def config_text(values: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
    """The sample, comments and all, with VALID and `values` set and `drop` removed."""
    yaml = YAML()
    yaml.indent(mapping=4, sequence=4, offset=2)
    data = yaml.load(sample_text())
    for key, value in {**VALID, **(values or {})}.items():
        *parents, last = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    for parts in (key.split(".") for key in drop):
        while parts:  # drop the key, then any section it leaves empty
            node = data
            for part in parts[:-1]:
                node = node[part]
            del node[parts.pop()]
            if node:
                break
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


def load(values: dict[str, Any] | None = None, drop: tuple[str, ...] = (), **env: str) -> Config:
    return Config.from_text(config_text(values, drop), env=env)


def error(
    values: dict[str, Any] | None = None, drop: tuple[str, ...] = (), **env: str
) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(values, drop, **env)
    return info.value


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("CLOAKROOM_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path



def test_sample_copies_are_identical() -> None:
    packaged = (ROOT / "bridge" / "config.sample.yaml").read_bytes()
    assert packaged == (ROOT / "config.sample.yaml").read_bytes()
    assert sample_text().encode() == packaged


def _key_lines(text: str) -> list[tuple[int, str, bool]]:
    """(line number, dotted key, is a leaf) for every `key:` mapping line."""
    stack: list[tuple[int, str]] = []
    found = []
    for number, line in enumerate(text.splitlines()):
        match = re.match(r"( *)([A-Za-z_][\w.-]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        found.append((number, ".".join(k for _, k in stack), bool(match.group(3).strip())))
    return found


def _paths(data: dict[str, Any], prefix: str = "") -> set[str]:
    paths = set()
    for key, value in data.items():
        paths.add(f"{prefix}{key}")
        if isinstance(value, dict):
            paths |= _paths(value, f"{prefix}{key}.")
    return paths


def test_every_sample_key_has_a_comment_directly_above() -> None:
    lines = sample_text().splitlines()
    keys = _key_lines(sample_text())
    # The line walk sees every key, no more, no fewer.
    assert {k for _, k, _ in keys} == _paths(YAML(typ="safe").load(sample_text()))
    undocumented = [k for n, k, _ in keys if not lines[n - 1].lstrip().startswith("#")]
    assert undocumented == []



def test_valid_config_loads() -> None:
    config = load()
    assert config["homeserver.domain"] == "localhost"
    assert config["appservice.as_token"] == "as-secret"
    assert config["logging.root.level"] == "INFO"
    assert config.get("appservice.nope", "fallback") == "fallback"
    assert config.bot_mxid == "@cloakroom:localhost"
    assert config.warnings == []


@pytest.mark.parametrize(
    ("key", "default"),
    [
        ("appservice.port", 29400),
        ("appservice.hostname", "127.0.0.1"),
        ("database", "sqlite:cloakroom.db"),
        ("bridge.username_template", "_email_{address}"),
        ("permissions", {}),
        ("logging", None),
    ],
)
def test_omitted_optional_keys_take_the_sample_default(key: str, default: Any) -> None:
    config = load({"appservice.port": 1, "database": "sqlite:other.db"}, drop=(key,))
    if default is None:
        assert config[f"{key}.version"] == 1
    else:
        assert config[key] == default


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_missing_required_key(key: str) -> None:
    e = error(drop=(key,))
    assert e.key == key
    assert key in str(e) and "missing" in str(e)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("appservice.port", "abc", "appservice.port"),
        ("appservice.port", True, "appservice.port"),
        ("appservice.port", 0, "appservice.port"),
        ("appservice.port", 70000, "appservice.port"),
        ("permissions", ["a"], "permissions"),
        ("permissions", {"localhost": "user", "@b:x": "superuser"}, "permissions.@b:x"),
        ("database", 5, "database"),
        ("homeserver.domain", 5, "homeserver.domain"),
        ("homeserver.domain", "", "homeserver.domain"),
        ("appservice.address", "ftp://localhost", "appservice.address"),
        ("homeserver.address", "http://[::1", "homeserver.address"),  # not even a URL
        ("bridge.username_template", "_email_", "bridge.username_template"),
        ("logging", {"root": {"level": "INFO"}}, "logging.version"),
        ("database", "mysql://u@h/db", "database"),
        ("database", "cloakroom.db", "database"),  # no scheme
        # Placeholders and example values left in.
        ("appservice.as_token", SAMPLE_PLACEHOLDER, "appservice.as_token"),
        ("appservice.hs_token", SAMPLE_PLACEHOLDER, "appservice.hs_token"),
        ("encryption.pickle_key", SAMPLE_PLACEHOLDER, "encryption.pickle_key"),
        ("homeserver.domain", "example.com", "homeserver.domain"),
        ("homeserver.address", "https://matrix.example.com", "homeserver.address"),
    ],
)
def test_wrong_value_names_the_key(key: str, value: Any, named: str) -> None:
    e = error({key: value})
    assert e.key == named
    assert named in str(e)


@pytest.mark.parametrize(
    "database", ["sqlite:/x.db", "sqlite:cloakroom.db", "postgres://u@h/db", "postgresql://h/db"]
)
def test_database_schemes_accepted(database: str) -> None:
    assert load({"database": database})["database"] == database



@pytest.mark.parametrize(
    ("env", "key", "expected"),
    [
        ({"CLOAKROOM_APPSERVICE__PORT": "1234"}, "appservice.port", 1234),
        ({"CLOAKROOM_HOMESERVER__DOMAIN": "other.org"}, "homeserver.domain", "other.org"),
        ({"CLOAKROOM_LOGGING__ROOT__LEVEL": "DEBUG"}, "logging.root.level", "DEBUG"),
        ({"CLOAKROOM_LOGGING__ROOT__LEVEL": "DEBUG"}, "logging.root.handlers", ["console"]),
        ({"CLOAKROOM_PERMISSIONS": '{"*": "admin"}'}, "permissions", {"*": "admin"}),
        ({"OTHER_APPSERVICE__PORT": "1"}, "appservice.port", 29400),
    ],
)
def test_env_overrides(tmp_path: Path, env: dict[str, str], key: str, expected: Any) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(config_text())
    for config in (load(**env), Config.load(path, env=env)):
        assert config[key] == expected and type(config[key]) is type(expected)


def test_env_supplies_a_required_key_missing_from_the_file() -> None:
    config = load(drop=("appservice.as_token",), CLOAKROOM_APPSERVICE__AS_TOKEN="from-env")
    assert config["appservice.as_token"] == "from-env"


@pytest.mark.parametrize(
    ("name", "raw", "key"),
    [
        ("CLOAKROOM_NOPE", "1", "CLOAKROOM_NOPE"),
        ("CLOAKROOM_APPSERVICE__NOPE", "1", "CLOAKROOM_APPSERVICE__NOPE"),
        ("CLOAKROOM_HOMESERVER", "x", "CLOAKROOM_HOMESERVER"),  # a section, not a key
        ("CLOAKROOM_APPSERVICE__PORT", "abc", "appservice.port"),
        ("CLOAKROOM_HOMESERVER__DOMAIN", "example.com", "homeserver.domain"),
        ("CLOAKROOM_DATABASE", "mysql://u@h/db", "database"),
    ],
)
def test_bad_env_names_the_variable_or_key(name: str, raw: str, key: str) -> None:
    e = error(**{name: raw})
    assert e.key == key and key in str(e)


def test_unknown_keys_in_the_file_are_warned_about() -> None:
    config = load({"extra": 1, "appservice.colour": "red", "permissions": {"@a:b": "admin"}})
    assert any("extra" in w for w in config.warnings)
    assert any("appservice.colour" in w for w in config.warnings)
    assert len(config.warnings) == 2  # free-form sections (permissions, logging) are not warned



@pytest.mark.parametrize(
    "content", [None, "- a list\n", "homeserver: [unclosed\n"], ids=["absent", "list", "bad-yaml"]
)
def test_load_unreadable_file(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "config.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        Config.load(path, env={})
    assert info.value.key == "config"


def test_write_values_keeps_comments_and_sets_nested_values(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(sample_text())
    path.chmod(0o644)
    write_values(path, {"homeserver.domain": "localhost", "new.nested.key": 5})
    text = path.read_text()
    comments = [line for line in sample_text().splitlines() if line.lstrip().startswith("#")]
    assert [line for line in text.splitlines() if line.lstrip().startswith("#")] == comments
    expected = sample_text().replace("domain: example.com", "domain: localhost")
    assert text.startswith(expected)
    data = YAML(typ="safe").load(text)
    assert data["new"] == {"nested": {"key": 5}}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left



@pytest.mark.parametrize(
    ("text", "named"),
    [
        (config_text(drop=("homeserver.domain",)), "homeserver.domain"),
        (config_text({"appservice.as_token": SAMPLE_PLACEHOLDER}), "appservice.as_token"),
        (config_text({"database": "mysql://u@h/db"}), "database"),
        (config_text({"homeserver.address": "http://[::1"}), "homeserver.address"),
        (None, "does not exist"),
    ],
    ids=["missing-key", "placeholder", "mysql", "bad-url", "no-file"],
)
def test_cli_bad_config_exits_10(
    clean_env: Path, capsys: pytest.CaptureFixture[str], text: str | None, named: str
) -> None:
    if text is not None:
        (clean_env / "config.yaml").write_text(text)
    assert main(["-c", "config.yaml"]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert named in err and "config.yaml" in err


def test_cli_missing_config_subprocess(clean_env: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOAKROOM_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "-c", "missing.yaml"],
        cwd=clean_env,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_CONFIG
    assert "missing.yaml" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr
