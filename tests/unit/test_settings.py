"""Settings from the environment: every bad variable named with what it accepts, all at once."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from service import tenants
from service.api.app import create_app
from service.settings import (
    Principal,
    Settings,
    SettingsError,
    _env_fields,
    hash_api_key,
    write_api_keys,
)


def problems(env: dict[str, str]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    return caught.value.problems


def test_defaults_are_valid_and_survive_a_round_trip_through_the_environment() -> None:
    defaults = Settings()  # validates itself: a default out of its own bounds raises here
    assert Settings.from_env({}) == defaults
    as_text = {
        var: str(getattr(defaults, name))
        for name, var, _ in _env_fields()
        if getattr(defaults, name) is not None
    }
    assert Settings.from_env(as_text) == defaults


def test_a_word_for_a_number_names_the_variable_and_what_it_accepts() -> None:
    assert problems({"FTUNE_MAX_ATTEMPTS": "three"}) == [
        "FTUNE_MAX_ATTEMPTS must be an integer ≥ 1, got 'three'"
    ]


@pytest.mark.parametrize(
    ("var", "value", "accepts"),
    [
        ("FTUNE_MAX_DATASET_BYTES", "-1", "an integer ≥ 1"),
        ("FTUNE_MAX_LINE_BYTES", "0", "an integer ≥ 1"),
        ("FTUNE_LEASE_SECONDS", "0", "a number > 0"),
        ("FTUNE_JOB_TIMEOUT_HOURS", "inf", "a number > 0"),
        ("FTUNE_WORKER_GPU_MEMORY_GB", "nan", "a number > 0"),
        ("FTUNE_WORKER_GRACE_SECONDS", "1.5", "an integer ≥ 0"),
        ("FTUNE_WORKER_METRICS_PORT", "70000", "an integer from 0 to 65535"),
        ("FTUNE_WORKER_METRICS_PORT", "-1", "an integer from 0 to 65535"),
        ("FTUNE_LOG_FORMAT", "xml", "one of json, text"),
        ("FTUNE_LOG_LEVEL", "verbose", "one of CRITICAL, DEBUG, ERROR, INFO, WARNING"),
        ("FTUNE_DEVICE", "tpu", "one of auto, cpu, cuda"),
        ("FTUNE_SCHEDULER_ENABLED", "maybe", "true or false (or 1/0, yes/no, on/off)"),
        ("FTUNE_WEBHOOK_ALLOW_PRIVATE", "2", "true or false (or 1/0, yes/no, on/off)"),
        ("FTUNE_STORE_URL", "/var/lib/ftune", "file:///absolute/path or s3://bucket[/prefix]"),
        ("FTUNE_STORE_URL", "gs://bucket", "file:///absolute/path or s3://bucket[/prefix]"),
        ("FTUNE_REDIS_URL", "localhost:6379", "a redis://, rediss:// or unix:// URL"),
        ("FTUNE_REDIS_URL", "redis://[::1:6379", "a redis://, rediss:// or unix:// URL"),
        ("FTUNE_S3_ENDPOINT_URL", "minio:9000", "an http:// or https:// URL"),
    ],
)
def test_a_bad_value_is_refused_with_what_would_do(var: str, value: str, accepts: str) -> None:
    assert problems({var: value}) == [f"{var} must be {accepts}, got {value!r}"]


def test_every_bad_variable_is_reported_together() -> None:
    found = problems(
        {"FTUNE_MAX_ATTEMPTS": "three", "FTUNE_LOG_FORMAT": "xml", "FTUNE_LEASE_SECONDS": "-2"}
    )
    assert [p.split()[0] for p in found] == [
        "FTUNE_MAX_ATTEMPTS",
        "FTUNE_LEASE_SECONDS",
        "FTUNE_LOG_FORMAT",
    ]


def test_accepted_spellings() -> None:
    settings = Settings.from_env(
        {
            "FTUNE_SCHEDULER_ENABLED": "Off",
            "FTUNE_WEBHOOK_ALLOW_PRIVATE": "yes",
            "FTUNE_LOG_LEVEL": "debug",
            "FTUNE_DEVICE": "CPU",
            "FTUNE_MAX_ATTEMPTS": " 5",
            "FTUNE_WORKER_METRICS_PORT": "0",
            "FTUNE_STORE_URL": "s3://bucket/prefix",
            "FTUNE_LOG_FORMAT": "",  # empty is unset: the default
        }
    )
    assert settings.scheduler_enabled is False and settings.webhook_allow_private is True
    assert (settings.log_level, settings.device, settings.log_format) == ("DEBUG", "cpu", "json")
    assert (settings.max_attempts, settings.worker_metrics_port) == (5, 0)


def test_settings_built_in_code_get_the_same_checks() -> None:
    with pytest.raises(SettingsError, match="FTUNE_LEASE_SECONDS must be a number > 0, got '0'"):
        replace(Settings(), lease_seconds=0)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot be read: No such file or directory"),
        ("{not json", "must be .* or map key hashes to"),
        (json.dumps({hash_api_key("k"): {"tenant": ""}}), "must be .* or map key hashes to"),
        (json.dumps({"plaintext-key": {"tenant": "a"}}), "must hold the sha256 hex of each"),
    ],
)
def test_an_unreadable_or_malformed_keys_file_is_named(
    tmp_path: Path, content: str | None, says: str
) -> None:
    keys = tmp_path / "keys.json"
    if content is not None:
        keys.write_text(content)
    settings = Settings(api_keys_file=keys)
    with pytest.raises(SettingsError, match=f"FTUNE_API_KEYS_FILE \\({keys}\\) {says}"):
        tenants.load(settings)
    with pytest.raises(SettingsError, match="FTUNE_API_KEYS_FILE"):
        create_app(settings)


def test_a_keys_file_maps_hashes_to_principals(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    write_api_keys(keys, {"secret": Principal("team", admin=True)})
    assert tenants.load(Settings(api_keys_file=keys)).keys == {
        hash_api_key("secret"): Principal("team", admin=True)
    }
