"""Validation reports every problem of a config at once, each naming its key."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import Config, ConfigError, ConfigErrors, problems_of

from .test_config import config_text


def problems(values: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
             **env: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        Config.from_text(config_text(values, drop), env=env)
    return [(p.key, p.message) for p in problems_of(info.value)]


def test_one_problem_is_a_plain_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_text(config_text({"appservice.port": "abc"}), env={})
    assert type(info.value) is ConfigError
    assert info.value.key == "appservice.port"


def test_problems_of_every_kind_are_reported_together() -> None:
    found = problems(
        {
            "email.rate_limit": 5,  # a number where a section belongs
            "appservice.port": "abc",  # the wrong type
            "database": "mysql://u@h/db",  # a value check
            "onboarding.guard": "sometimes",  # a later value check
            "email.max_size": 0,  # one inside _validate_email
        },
        drop=("appservice.hs_token",),  # missing
        CLOAKROOM_NOPE="1",  # a variable naming no key
    )
    assert [key for key, _ in found] == [
        "email.rate_limit",
        "CLOAKROOM_NOPE",
        "appservice.hs_token",
        "appservice.port",
        "database",
        "email.max_size",
        "onboarding.guard",
    ]
    assert ("email.rate_limit", "must be a mapping of keys, got an integer (5)") in found


def test_a_missing_key_is_reported_once() -> None:
    # The sample's placeholder stands in for it: not a second "still the placeholder".
    assert problems(drop=("encryption.pickle_key",)) == [
        ("encryption.pickle_key", "missing; this key is required")
    ]


def test_a_check_that_fails_again_resets_the_section() -> None:
    """tls_cert without tls_key names tls_key; resetting tls_key alone would fail the same way
    for ever. The listen section is reset instead, and the checks after it still run."""
    found = problems({"email.listen.tls_cert": "/cert.pem", "onboarding.guard": "x"})
    assert found == [
        ("email.listen.tls_key", "tls_cert and tls_key go together"),
        ("onboarding.guard", "must be private, dm or off"),
    ]


def test_a_section_given_as_a_number_is_not_also_an_unknown_key() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_text(config_text({"email.rate_limit": 5}), env={})
    assert info.value.key == "email.rate_limit"
    # An empty section still means every default.
    config = Config.from_text(config_text({"email.rate_limit": None}), env={})
    assert config["email.rate_limit.per_sender_per_hour"] == 120
    assert config.warnings == []


def test_the_combined_error_reads_as_all_of_them() -> None:
    with pytest.raises(ConfigErrors) as info:
        Config.from_text(config_text({"appservice.port": "x", "onboarding.guard": "x"}), env={})
    assert str(info.value) == (
        "appservice.port: must be an integer, got a string ('x'); "
        "onboarding.guard: must be private, dm or off"
    )
    assert info.value.key == "appservice.port"  # the first, for code that reads one key
