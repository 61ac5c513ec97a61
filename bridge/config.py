"""Loading, validating and updating the bridge configuration.

The packaged ``config.sample.yaml`` is the one source of truth for keys, their types and their
defaults. A user's file is laid over it, then the environment over that. Anything wrong stops
start-up with a :class:`ConfigError` that names the key, so the admin knows what to fix.
"""

from __future__ import annotations

import copy
import io
import ipaddress
import os
import secrets
from collections.abc import Iterator, Mapping, MutableMapping
from importlib import resources
from pathlib import Path
from typing import Any

import yarl
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

ENV_PREFIX = "CLOAKROOM_"
PLACEHOLDER = "This value is generated"

# Keys an admin must set; everything else falls back to the sample's default.
REQUIRED_KEYS = (
    "homeserver.address",
    "homeserver.domain",
    "appservice.address",
    "appservice.as_token",
    "appservice.hs_token",
    "encryption.pickle_key",
)
# Sample values that are examples, not defaults: leaving them in means the file was not edited.
EXAMPLE_VALUES = {
    "homeserver.address": "https://matrix.example.com",
    "homeserver.domain": "example.com",
}
# Mappings whose contents are free-form: only their type is checked against the sample.
OPAQUE_KEYS = ("permissions", "logging")
# Keys that -g fills in.
GENERATED_KEYS = ("appservice.as_token", "appservice.hs_token", "encryption.pickle_key")
DATABASE_SCHEMES = ("sqlite", "sqlite3", "postgres", "postgresql")
PERMISSION_LEVELS = ("none", "user", "admin")


class ConfigError(Exception):
    """A configuration problem, always about one key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ConfigErrors(ConfigError):
    """Several configuration problems, found in one pass: ``errors`` holds each of them."""

    def __init__(self, errors: list[ConfigError]) -> None:
        super().__init__(errors[0].key, errors[0].message)
        self.args = ("; ".join(str(e) for e in errors),)
        self.errors = errors


def problems_of(error: ConfigError) -> list[ConfigError]:
    """The single problems a ConfigError stands for (one, or each of a ConfigErrors)."""
    return list(getattr(error, "errors", [error]))


def raise_problems(errors: list[ConfigError]) -> None:
    """Raise the problems found, if any: one as itself, several together."""
    unique: dict[str, ConfigError] = {}
    for error in errors:
        unique.setdefault(error.key, error)  # one report per key: the first is the cause
    if len(unique) == 1:
        raise next(iter(unique.values()))
    if unique:
        raise ConfigErrors(list(unique.values()))


def _read_text(path: Path) -> str:
    """The config file's text; an unreadable path is a ConfigError that says what -c needs."""
    try:
        return path.read_text("utf-8")
    except FileNotFoundError:
        raise ConfigError("config", f"{path} does not exist; copy config.sample.yaml") from None
    except IsADirectoryError:
        raise ConfigError(
            "config", f"{path} is a directory; -c takes the path of the config file"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError("config", f"{path} is not UTF-8 text; is it the config file?") from None
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror or e}") from None


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.indent(mapping=4, sequence=4, offset=2)
    yaml.width = 100
    yaml.preserve_quotes = True
    return yaml


def sample_text() -> str:
    return resources.files("bridge").joinpath("config.sample.yaml").read_text("utf-8")


def load_sample() -> CommentedMap:
    return _yaml().load(sample_text())


def _leaves(data: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Yield (dotted key, value) for every leaf; opaque mappings count as leaves."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in OPAQUE_KEYS:
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def _get(data: Mapping[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(data, Mapping) or part not in data:
            raise KeyError(key)
        data = data[part]
    return data


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for i, part in enumerate(parents):
        child = data.get(part)
        if child is None:  # absent, or `section:` left empty
            child = data[part] = CommentedMap()
        elif not isinstance(child, MutableMapping):
            raise ConfigError(".".join(parents[: i + 1]), f"must be a mapping, got {child!r}")
        data = child
    data[last] = value


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _same_type(default: Any, value: Any) -> bool:
    # bool is an int in Python; in a config file "port: true" is a mistake, not 1.
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    for kind in (int, str, Mapping, list):
        if isinstance(default, kind):
            return isinstance(value, kind)
    return True



def _section_problems(
    sample: Mapping[str, Any], user: Any, prefix: str = ""
) -> list[ConfigError]:
    """A value where the sample has a section (`rate_limit: 5`): the section's keys would
    silently keep their defaults, so this is an error rather than an unknown key."""
    found: list[ConfigError] = []
    if not isinstance(user, Mapping):
        return found
    for key, default in sample.items():
        path = f"{prefix}{key}"
        if not isinstance(default, Mapping) or path in OPAQUE_KEYS or key not in user:
            continue
        value = user[key]
        if isinstance(value, Mapping):
            found += _section_problems(default, value, f"{path}.")
        elif value is not None:  # `section:` left empty means every default
            found.append(ConfigError(
                path, f"must be a mapping of keys, got {_type_name(value)} ({value!r})"
            ))
    return found


def _apply_env(data: dict[str, Any], env: Mapping[str, str], known: set[str]) -> list[ConfigError]:
    """Lay CLOAKROOM_* variables over the values; returns the problems with them."""
    found: list[ConfigError] = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        key = ".".join(p.lower() for p in name[len(ENV_PREFIX) :].split("__"))
        if key not in known and key.split(".", 1)[0] not in OPAQUE_KEYS:
            found.append(ConfigError(name, f"environment variable names no config key ({key})"))
            continue
        try:
            value = YAML(typ="safe").load(io.StringIO(raw))
            _set(data, key, "" if value is None else value)
        except YAMLError as e:
            found.append(ConfigError(name, f"not a valid YAML value: {e}"))
        except ConfigError as e:
            found.append(ConfigError(name, f"cannot be set: {e}"))
    return found


def _sample_path(sample: Mapping[str, Any], key: str) -> str:
    """The longest prefix of a problem's key that the sample has ('' when none)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        try:
            _get(sample, candidate)
        except KeyError:
            continue
        return candidate
    return ""

class Config:
    """The effective configuration: sample defaults, then the file, then the environment."""

    def __init__(self, data: dict[str, Any], path: Path | None = None) -> None:
        self._data = data
        self.path = path
        self.warnings: list[str] = []

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], env: Mapping[str, str] | None = None
    ) -> Config:
        path = Path(path)
        text = _read_text(path)
        return cls.from_text(text, env=os.environ if env is None else env, path=path)

    @classmethod
    def from_text(
        cls, text: str, env: Mapping[str, str] | None = None, path: Path | None = None
    ) -> Config:
        try:
            user = YAML(typ="safe").load(text) or {}
        except YAMLError as e:
            raise ConfigError("config", f"not valid YAML: {e}") from None
        if not isinstance(user, Mapping):
            raise ConfigError("config", "the file must be a mapping of keys")
        config = cls._merge(user, env or {})
        config.path = path
        return config

    @classmethod
    def _merge(cls, user: Mapping[str, Any], env: Mapping[str, str]) -> Config:
        sample = YAML(typ="safe").load(sample_text())
        errors = _section_problems(sample, user)
        data: dict[str, Any] = {}
        missing = []
        for key, default in _leaves(sample):
            try:
                data_value = _get(user, key)
            except KeyError:
                if key in REQUIRED_KEYS:
                    missing.append(key)  # the environment may still set it
                    continue
                data_value = copy.deepcopy(default)
            _set(data, key, data_value)
        known = {key for key, _ in _leaves(sample)}
        # A section left empty, or given a value (an error above), is no unknown key.
        sections = {
            ".".join(parts[:end]) for parts in (k.split(".") for k in known)
            for end in range(1, len(parts))
        }
        warnings = [
            f"{key}: unknown key, ignored"
            for key, _ in _leaves(user)
            if key not in known
            and key not in sections
            and not any(key.startswith(f"{o}.") for o in OPAQUE_KEYS)
        ]
        errors += _apply_env(data, env, known)
        for key in missing:
            try:
                _get(data, key)
            except KeyError:
                errors.append(ConfigError(key, "missing; this key is required"))
                # The sample's value stands in, so the other keys are still checked.
                _set(data, key, copy.deepcopy(_get(sample, key)))
        config = cls(data)
        config.warnings = warnings
        raise_problems(errors + config.problems(sample))
        return config

    def validate(self, sample: Mapping[str, Any], allow_placeholders: bool = False) -> None:
        raise_problems(self.problems(sample, allow_placeholders))

    def problems(
        self, sample: Mapping[str, Any], allow_placeholders: bool = False
    ) -> list[ConfigError]:
        """Every problem, each naming its key. A key found wrong gets the sample's value in a
        copy, so the checks of the other keys still run and one pass reports them all."""
        found = []
        probe = Config(copy.deepcopy(self._data))
        for key, default in _leaves(sample):
            problem = self._leaf_problem(key, default, allow_placeholders)
            if problem:
                found.append(problem)
                _set(probe._data, key, copy.deepcopy(default))
        return found + probe._value_problems(sample)

    def _leaf_problem(self, key: str, default: Any, allow_placeholders: bool) -> ConfigError | None:
        try:
            value = self[key]
        except KeyError:
            return ConfigError(key, "missing; this key is required")
        if not _same_type(default, value):
            return ConfigError(
                key, f"must be {_type_name(default)}, got {_type_name(value)} ({value!r})"
            )
        if isinstance(value, str) and value.startswith(PLACEHOLDER) and not allow_placeholders:
            return ConfigError(
                key, "still the placeholder; run `python -m bridge -g` to generate it"
            )
        if key in EXAMPLE_VALUES and value == EXAMPLE_VALUES[key]:
            return ConfigError(key, f"still the example value {value!r}; set your own")
        if key in REQUIRED_KEYS and not value:
            return ConfigError(key, "must not be empty")
        return None

    def _value_problems(self, sample: Mapping[str, Any]) -> list[ConfigError]:
        """_validate_values, run until it passes. It stops at a problem: that key (its section,
        if the same check fails again) then takes the sample's value and the checks run again.
        Changes the values: call it on a copy."""
        found: list[ConfigError] = []
        reset: set[str] = set()
        while True:
            try:
                self._validate_values()
                return found
            except ConfigError as e:
                found.append(e)
                target = _sample_path(sample, e.key)
                while target in reset and "." in target:
                    target = target.rpartition(".")[0]
                if not target or target in reset:
                    return found  # nothing left to reset: the checks after it cannot run
                reset.add(target)
                _set(self._data, target, copy.deepcopy(_get(sample, target)))

    def _validate_values(self) -> None:
        for key in ("homeserver.address", "appservice.address"):
            try:
                url = yarl.URL(self[key])
            except ValueError as e:
                raise ConfigError(key, f"not a valid URL ({e}): {self[key]!r}") from None
            if url.scheme not in ("http", "https") or not url.host:
                raise ConfigError(key, f"must be an http(s) URL, got {self[key]!r}")
        if not 0 < self["appservice.port"] < 65536:
            port = self["appservice.port"]
            raise ConfigError("appservice.port", f"must be a TCP port, got {port}")
        try:
            scheme = yarl.URL(self["database"]).scheme
        except ValueError as e:
            raise ConfigError("database", f"not a valid URL ({e})") from None
        if scheme not in DATABASE_SCHEMES:
            raise ConfigError(
                "database",
                f"unknown database scheme {scheme!r}; use sqlite:PATH or postgres://…",
            )
        if "{address}" not in self["bridge.username_template"]:
            raise ConfigError("bridge.username_template", "must contain {address}")
        for pattern, level in self["permissions"].items():
            if level not in PERMISSION_LEVELS:
                raise ConfigError(
                    f"permissions.{pattern}",
                    f"unknown level {level!r}; use one of {', '.join(PERMISSION_LEVELS)}",
                )
        self._validate_email()
        if self["onboarding.guard"] not in ("private", "dm", "off"):
            raise ConfigError("onboarding.guard", "must be private, dm or off")
        if self["onboarding.nudge_interval_days"] <= 0:
            raise ConfigError("onboarding.nudge_interval_days", "must be positive")
        if self["encryption.share_with"] not in ("all", "cross-signed"):
            raise ConfigError("encryption.share_with", "must be all or cross-signed")
        if not 0 <= self["metrics.listen.port"] < 65536:
            port = self["metrics.listen.port"]
            raise ConfigError("metrics.listen.port", f"must be a TCP port or 0, got {port}")
        if self["metrics.timeout"] <= 0:
            raise ConfigError("metrics.timeout", "must be positive")
        if self["logging"].get("version") != 1:
            raise ConfigError("logging.version", "must be 1 (logging.config.dictConfig schema)")

    def _validate_email(self) -> None:
        if self["email.listen.protocol"] not in ("smtp", "lmtp"):
            raise ConfigError("email.listen.protocol", "must be smtp or lmtp")
        if bool(self["email.listen.tls_cert"]) != bool(self["email.listen.tls_key"]):
            raise ConfigError("email.listen.tls_key", "tls_cert and tls_key go together")
        if self["email.relay.security"] not in ("none", "starttls", "tls"):
            raise ConfigError("email.relay.security", "must be none, starttls or tls")
        if self["email.threads"] not in ("auto", "replies", "threads"):
            raise ConfigError("email.threads", "must be auto, replies or threads")
        if self["email.outbound.edits"] not in ("notice", "correction"):
            raise ConfigError("email.outbound.edits", "must be notice or correction")
        if bool(self["email.dkim.selector"]) != bool(self["email.dkim.private_key"]):
            raise ConfigError("email.dkim.private_key", "selector and private_key go together")
        for network in self["email.rate_limit.exempt_networks"] or []:
            try:
                ipaddress.ip_network(str(network), strict=False)
            except ValueError:
                raise ConfigError(
                    "email.rate_limit.exempt_networks", f"{network!r} is not an IP network"
                ) from None
        if not 0 <= self["email.policy.listen.port"] < 65536:
            port = self["email.policy.listen.port"]
            raise ConfigError("email.policy.listen.port", f"must be a TCP port or 0, got {port}")
        for key in ("email.listen.port", "email.auth.dns_port", "email.relay.port"):
            if not 0 < self[key] < 65536:
                raise ConfigError(key, f"must be a TCP/UDP port, got {self[key]}")
        for key in (
            "email.max_size",
            "email.max_recipients",
            "email.max_header_size",
            "email.listen.max_connections",
            "email.listen.connections_per_ip_per_minute",
            "email.rate_limit.null_sender_per_ip_per_hour",
            "email.auth.dns_timeout",
            "email.rate_limit.per_sender_per_hour",
            "email.rate_limit.per_recipient_per_hour",
            "email.delivery.give_up_after_hours",
            "email.retention_days",
            "email.relay.timeout",
            "email.outbound.lifetime_hours",
            "email.outbound.rate_limit",
            "email.outbound.max_recipients",
            "email.outbound.rate_window_seconds",
            "email.hold.max_messages",
            "email.hold.max_bytes",
        ):
            if self[key] <= 0:
                raise ConfigError(key, f"must be positive, got {self[key]}")
        if self["email.retention_days"] * 86400 < self["email.outbound.rate_window_seconds"]:
            # Outbox rows count for the sending rate limit: pruned sooner, they would reset it.
            raise ConfigError(
                "email.retention_days", "must cover email.outbound.rate_window_seconds"
            )

    @property
    def email_domain(self) -> str:
        return self["email.domain"] or self["homeserver.domain"]

    def __getitem__(self, key: str) -> Any:
        return _get(self._data, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    @property
    def bot_mxid(self) -> str:
        return f"@{self['appservice.bot_username']}:{self['homeserver.domain']}"


def load_for_registration(path: str | os.PathLike[str], env: Mapping[str, str]) -> Config:
    """Load a config that may still hold the placeholders that -g is about to replace."""
    try:
        user = YAML(typ="safe").load(_read_text(Path(path))) or {}
    except YAMLError as e:
        raise ConfigError("config", f"not valid YAML: {e}") from None
    if not isinstance(user, Mapping):
        raise ConfigError("config", "the file must be a mapping of keys")
    for key in GENERATED_KEYS:
        try:
            value = _get(user, key)
        except KeyError:
            value = None
        # Absent, empty or the placeholder: -g is about to fill it in.
        if value is None or value == "" or str(value).startswith(PLACEHOLDER):
            _set(user, key, PLACEHOLDER.replace(" ", "-"))  # validated as an ordinary string
    return Config._merge(user, env)


def generate_secrets() -> dict[str, str]:
    return {
        "appservice.as_token": secrets.token_urlsafe(48),
        "appservice.hs_token": secrets.token_urlsafe(48),
        "encryption.pickle_key": secrets.token_urlsafe(32),
    }


def write_values(path: str | os.PathLike[str], values: Mapping[str, Any]) -> None:
    """Set keys in a config file, keeping its comments and layout (ruamel round trip)."""
    path = Path(path)
    yaml = _yaml()
    data = yaml.load(path.read_text("utf-8")) or CommentedMap()
    for key, value in values.items():
        _set(data, key, value)
    tmp = path.with_name(f".{path.name}.tmp")
    # The file holds the tokens and the pickle key: owner-only from the moment it exists
    # (fchmod too, in case a stale temporary file from a crashed run is reused).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.dump(data, f)
    os.replace(tmp, path)
