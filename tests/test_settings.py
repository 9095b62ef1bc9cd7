"""`Settings.from_env`: every LOCALQ_* variable, its default, and malformed values naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import DEFAULT_MODELS_DIR, Settings


def test_defaults():
    settings = Settings.from_env({})
    assert settings.models_dir == DEFAULT_MODELS_DIR
    assert settings.unknown_fields == "reject"
    assert settings.max_request_bytes == 64 * 1024 * 1024
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.queue.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.api_keys == frozenset()
    assert settings.cors_origins == ()
    assert settings.max_queue_depth == 256
    assert settings.queue.job_timeout == 600.0
    assert settings.queue.job_ttl == 86400
    assert settings.keepalive_interval == 15.0


def test_every_variable_is_read(tmp_path):
    settings = Settings.from_env({
        "LOCALQ_MODELS_DIR": str(tmp_path),
        "LOCALQ_UNKNOWN_FIELDS": "ignore",
        "LOCALQ_MAX_REQUEST_BYTES": "1024",
        "LOCALQ_HOST": "0.0.0.0",
        "LOCALQ_PORT": "9000",
        "LOCALQ_REDIS_URL": "redis://:secret@redis.internal:6380/2",
        "LOCALQ_API_KEYS": "sk-one, sk-two",
        "LOCALQ_CORS_ORIGINS": "http://localhost:3000, https://app.example.com/",
        "LOCALQ_MAX_QUEUE_DEPTH": "8",
        "LOCALQ_JOB_TIMEOUT": "2.5",
        "LOCALQ_JOB_TTL": "60",
        "LOCALQ_SSE_KEEPALIVE": "0.5",
        "LOCALQ_RELAY_RIDE_OVER": "0",
    })
    assert settings.models_dir == Path(tmp_path)
    assert settings.unknown_fields == "ignore"
    assert settings.max_request_bytes == 1024
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.queue.redis_url == "redis://:secret@redis.internal:6380/2"
    assert settings.api_keys == frozenset({"sk-one", "sk-two"})
    assert settings.cors_origins == ("http://localhost:3000", "https://app.example.com")
    assert settings.max_queue_depth == 8
    assert settings.queue.job_timeout == 2.5
    assert settings.queue.job_ttl == 60
    assert settings.keepalive_interval == 0.5
    assert settings.relay_ride_over == 0


@pytest.mark.parametrize(
    "url", ["redis://localhost", "rediss://cache.example.com:6380/1", "unix:///run/redis.sock?db=0",
            "redis+socket:///tmp/redis.sock"],
)
def test_redis_url_schemes(url):
    assert Settings.from_env({"LOCALQ_REDIS_URL": url}).queue.redis_url == url


def test_blank_redis_url_means_default():
    assert Settings.from_env({"LOCALQ_REDIS_URL": " "}).queue.redis_url == "redis://127.0.0.1:6379/0"


def test_keys_file_merges_with_listed_keys(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nsk-file-1\n\n   sk-file-2   \n  # sk-commented-out\nsk-one\n")
    settings = Settings.from_env({"LOCALQ_API_KEYS": "sk-one,sk-two", "LOCALQ_API_KEYS_FILE": str(keys_file)})
    assert settings.api_keys == frozenset({"sk-one", "sk-two", "sk-file-1", "sk-file-2"})


def test_keys_file_alone(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-only\n")
    assert Settings.from_env({"LOCALQ_API_KEYS_FILE": str(keys_file)}).api_keys == {"sk-only"}


def test_blank_api_keys_mean_none():
    assert Settings.from_env({"LOCALQ_API_KEYS": "", "LOCALQ_API_KEYS_FILE": ""}).api_keys == frozenset()


def test_cors_star_and_duplicates():
    settings = Settings.from_env({"LOCALQ_CORS_ORIGINS": "*, http://a.test, http://a.test/"})
    assert settings.cors_origins == ("*", "http://a.test")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LOCALQ_UNKNOWN_FIELDS", "sometimes"),
        ("LOCALQ_MAX_REQUEST_BYTES", "lots"),
        ("LOCALQ_MAX_REQUEST_BYTES", "0"),
        ("LOCALQ_PORT", "http"),
        ("LOCALQ_PORT", "-1"),
        ("LOCALQ_REDIS_URL", "localhost:6379"),
        ("LOCALQ_REDIS_URL", "http://localhost:6379/0"),
        ("LOCALQ_REDIS_URL", "redis://localhost:port/0"),
        ("LOCALQ_REDIS_URL", "redis:///0"),
        ("LOCALQ_API_KEYS", ", ,"),
        ("LOCALQ_API_KEYS", "sk one"),
        ("LOCALQ_API_KEYS", "sk-\u00e9t\u00e9"),
        ("LOCALQ_CORS_ORIGINS", "localhost:3000"),
        ("LOCALQ_CORS_ORIGINS", "ftp://files.example.com"),
        ("LOCALQ_CORS_ORIGINS", "http://example.com/app"),
        ("LOCALQ_CORS_ORIGINS", "http://example.com:99999"),
        ("LOCALQ_MAX_QUEUE_DEPTH", "many"),
        ("LOCALQ_MAX_QUEUE_DEPTH", "0"),
        ("LOCALQ_MAX_QUEUE_DEPTH", "2.5"),
        ("LOCALQ_JOB_TIMEOUT", "ten"),
        ("LOCALQ_JOB_TIMEOUT", "0"),
        ("LOCALQ_JOB_TIMEOUT", "-5"),
        ("LOCALQ_JOB_TIMEOUT", "inf"),
        ("LOCALQ_JOB_TIMEOUT", "nan"),
        ("LOCALQ_JOB_TTL", "1d"),
        ("LOCALQ_JOB_TTL", "0"),
        ("LOCALQ_JOB_TTL", "soon"),
        ("LOCALQ_SSE_KEEPALIVE", "often"),
        ("LOCALQ_SSE_KEEPALIVE", "0"),
        ("LOCALQ_SSE_KEEPALIVE", "-1"),
        ("LOCALQ_RELAY_RIDE_OVER", "-1"),
        ("LOCALQ_RELAY_RIDE_OVER", "a while"),
    ],
)
def test_malformed_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_missing_keys_file_names_the_variable(tmp_path):
    with pytest.raises(ValueError, match="LOCALQ_API_KEYS_FILE"):
        Settings.from_env({"LOCALQ_API_KEYS_FILE": str(tmp_path / "absent")})


def test_keys_file_without_keys_is_an_error(tmp_path):
    """A file meant to lock the API must not leave it open because it only holds comments."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="LOCALQ_API_KEYS_FILE.*contains no key"):
        Settings.from_env({"LOCALQ_API_KEYS_FILE": str(keys_file)})


def test_bad_key_in_file_names_the_variable_without_echoing_it(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-good\nsk bad secret\n")
    with pytest.raises(ValueError, match="LOCALQ_API_KEYS_FILE") as info:
        Settings.from_env({"LOCALQ_API_KEYS_FILE": str(keys_file)})
    assert "secret" not in str(info.value)
