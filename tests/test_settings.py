"""`Settings.from_env` and `WorkerSettings.from_env`: every LOCALQ_* variable, its default, malformed
values naming it; and the limits derived from the job timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.settings import DEFAULT_MODELS_DIR, Settings
from tasks.settings import HARD_LIMIT_MARGIN, QueueSettings
from tasks.worker_settings import WorkerSettings

WORKER_VARIABLES = {"LOCALQ_MAX_LOADED_MODELS", "LOCALQ_MODEL_CACHE_BYTES", "LOCALQ_HEARTBEAT_INTERVAL"}


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
    assert settings.batch_window is None
    assert settings.queue.models_dir == DEFAULT_MODELS_DIR
    assert WorkerSettings.from_env({}) == WorkerSettings(max_loaded_models=8, model_cache_bytes=None,
                                                         heartbeat_interval=2.0)


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
        "LOCALQ_BODY_READ_TIMEOUT": "3",
        "LOCALQ_MAX_DELIVERIES": "5",
        "LOCALQ_RESUME_GRACE": "0",
        "LOCALQ_GENERATED_TTL": "120",
        "LOCALQ_FILES_DIR": str(tmp_path / "files"),
        "LOCALQ_MAX_FILE_BYTES": "2048",
        "LOCALQ_MAX_BATCH_FILE_BYTES": "1000",
        "LOCALQ_BATCH_SWEEP_INTERVAL": "0.5",
        "LOCALQ_BATCH_WINDOW": "30",
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
    assert settings.body_read_timeout == 3
    assert settings.batch_window == 30
    queue = settings.queue
    assert queue.models_dir == settings.models_dir  # one read, shared by the API and the workers
    assert (queue.max_deliveries, queue.resume_grace, queue.generated_ttl) == (5, 0, 120)
    assert queue.files_dir == tmp_path / "files"
    assert (queue.max_file_bytes, queue.max_batch_file_bytes) == (2048, 1000)
    assert queue.batch_sweep_interval == 0.5


def test_every_worker_variable_is_read():
    worker = WorkerSettings.from_env({"LOCALQ_MAX_LOADED_MODELS": "2", "LOCALQ_MODEL_CACHE_BYTES": "4096",
                                      "LOCALQ_HEARTBEAT_INTERVAL": "0.25"})
    assert (worker.max_loaded_models, worker.model_cache_bytes, worker.heartbeat_interval) == (2, 4096, 0.25)
    assert WorkerSettings.from_env({"LOCALQ_MODEL_CACHE_BYTES": " "}).model_cache_bytes is None


@pytest.mark.parametrize("name", ["LOCALQ_MODELS_DIR", "LOCALQ_BATCH_WINDOW"])
def test_blank_means_unset(name):
    """Blank values of these optional variables mean their defaults, as the code that read them did."""
    assert Settings.from_env({name: " "}) == Settings.from_env({})


def test_derived_limits_for_the_default_job_timeout():
    """The numbers Celery, the broker, the sweep and the launchers used before they were derived here."""
    queue = QueueSettings()
    assert HARD_LIMIT_MARGIN == 30.0
    assert queue.hard_limit == 630.0
    assert queue.visibility_timeout == 660 and isinstance(queue.visibility_timeout, int)
    assert queue.drain_timeout == 630.0
    assert queue.finalize_grace == 660.0
    assert queue.hard_limit_for(10.0) == 40.0


def test_derived_limits_follow_a_custom_job_timeout():
    long = QueueSettings.from_env({"LOCALQ_JOB_TIMEOUT": "1000.5"})
    assert long.hard_limit == 1030.5
    assert long.visibility_timeout == 1060  # whole seconds, as kombu's Redis transport takes them
    assert long.drain_timeout == 1030.5
    assert long.finalize_grace == 1060.5
    short = QueueSettings.from_env({"LOCALQ_JOB_TIMEOUT": "5"})
    assert (short.hard_limit, short.visibility_timeout, short.drain_timeout) == (35.0, 65, 35.0)
    assert short.finalize_grace == 660.0  # never under the default job's: a finalize may wait behind one


def test_celery_and_the_sweep_use_the_derived_limits():
    from tasks.celery_app import make_app

    settings = QueueSettings(job_timeout=100.0)
    conf = make_app(settings).conf
    assert conf.task_soft_time_limit == 100.0
    assert conf.task_time_limit == settings.hard_limit == 130.0
    assert conf.broker_transport_options["visibility_timeout"] == settings.visibility_timeout == 160


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
        ("LOCALQ_BATCH_WINDOW", "1h"),
        ("LOCALQ_BATCH_WINDOW", "0"),
        ("LOCALQ_BATCH_WINDOW", "-5"),
        ("LOCALQ_MAX_LOADED_MODELS", "some"),
        ("LOCALQ_MAX_LOADED_MODELS", "0"),
        ("LOCALQ_MODEL_CACHE_BYTES", "lots"),
        ("LOCALQ_MODEL_CACHE_BYTES", "8GiB"),
        ("LOCALQ_MODEL_CACHE_BYTES", "0"),
        ("LOCALQ_HEARTBEAT_INTERVAL", "fast"),
        ("LOCALQ_HEARTBEAT_INTERVAL", "0"),
        ("LOCALQ_HEARTBEAT_INTERVAL", "-1"),
        ("LOCALQ_MODELS_DIR", "bad\x00dir"),
    ],
)
def test_malformed_value_names_the_variable(name, value):
    read = WorkerSettings.from_env if name in WORKER_VARIABLES else Settings.from_env
    with pytest.raises(ValueError, match=name):
        read({name: value})


def test_models_dir_must_be_a_folder(tmp_path):
    not_a_folder = tmp_path / "models.yaml"
    not_a_folder.write_text("name: x\n")
    with pytest.raises(ValueError, match="LOCALQ_MODELS_DIR"):
        Settings.from_env({"LOCALQ_MODELS_DIR": str(not_a_folder)})


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
