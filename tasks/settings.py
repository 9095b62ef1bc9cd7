"""Queue settings shared by the API (which enqueues) and the workers (which run jobs).

Read from the environment once per process, so that both sides agree on the broker, on how long
job records live and on how long a job may run. Every `LOCALQ_*` variable is read and checked
here, in `api.settings` (the API's own) or in `tasks.worker_settings` (a worker's own), nowhere
else, so a typo stops start-up with an error naming it. The limits derived from the job timeout
(Celery's hard limit, the broker's visibility timeout, how long a warm shutdown waits) are
properties here, so every part derives the same numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tasks.redis_url import parse_sentinel_url, redacted

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: The `models/` folder that ships next to the packages in a source checkout.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
#: Where uploaded files (`/v1/files`) keep their bytes: `var/files` in the source checkout.
DEFAULT_FILES_DIR = Path(__file__).resolve().parent.parent / "var" / "files"
REDIS_URL_SCHEMES = ("redis", "rediss", "unix", "redis+socket", "sentinel")
#: Seconds between a job's soft time limit (the job is told to stop) and its hard one (Celery
#: kills the pool process): room for the job to record its outcome.
HARD_LIMIT_MARGIN = 30.0


@dataclass(frozen=True)
class QueueSettings:
    redis_url: str = DEFAULT_REDIS_URL
    # how long a job's record and event log stay readable after their last write
    job_ttl: float = 86400.0
    # default and upper bound of a job's run time (a request may ask for less with `timeout`)
    job_timeout: float = 600.0
    # deliveries of one job before it is failed instead of retried (a job that kills its worker)
    max_deliveries: int = 3
    # how long a detached client has to resume a job's stream before the job is cancelled
    resume_grace: float = 2.0
    # how long a finished job's token-level event log is kept, so a client can still resume or replay
    # it; after that only its record (status, result or error, usage, times) stays, for `job_ttl`
    resume_window: float = 600.0
    # how long generated files (images and audio answered by URL) stay downloadable
    generated_ttl: float = 3600.0
    # how long a stored response (the Responses API, `store: true`) is kept after its last write
    response_ttl: float = 30 * 86400.0
    # the bytes of `/v1/files` uploads and of files localq writes (batch output); metadata is in Redis
    files_dir: Path = DEFAULT_FILES_DIR
    # largest file `/v1/files` accepts (OpenAI: 512 MB), and for purpose=batch (OpenAI: 200 MB)
    max_file_bytes: int = 512 * 1024 * 1024
    max_batch_file_bytes: int = 200 * 1024 * 1024
    # how often the batch sweep runs (tasks/sweeper.py: expires batches past their completion window,
    # sends a finalize or lines the broker lost); one worker per interval, whichever takes the lock
    batch_sweep_interval: float = 60.0
    # model configs (and, by default, weights); the API reads them too (`api.settings.Settings`)
    models_dir: Path = DEFAULT_MODELS_DIR
    # batch chunks admitted into one queue at a time (`store.admission`); None: the job slots of the
    # live workers that consume the queue, plus one
    batch_admit: int | None = None
    # seconds of work a project that starts waiting may be served ahead of the others (`store.admission`)
    fair_lag: float = 30.0

    def hard_limit_for(self, soft_limit: float) -> float:
        """Celery's hard time limit for a job given `soft_limit` seconds (a request may ask for less)."""
        return soft_limit + HARD_LIMIT_MARGIN

    @property
    def hard_limit(self) -> float:
        """The longest a job runs before Celery kills its pool process."""
        return self.hard_limit_for(self.job_timeout)

    @property
    def visibility_timeout(self) -> int:
        """The broker's visibility timeout, whole seconds: longer than the hard limit, so a running
        job is not handed to a second worker while the first is still on it."""
        return int(self.hard_limit + HARD_LIMIT_MARGIN)

    @property
    def drain_timeout(self) -> float:
        """How long `localq up` / `localq worker` wait for a warm shutdown before killing workers:
        every job has met its hard time limit by then."""
        return self.hard_limit

    @property
    def finalize_grace(self) -> float:
        """How long after a batch's last line its finalize may take to run before the sweep sends
        it again: a finalize waits behind at most the job each worker is running (the visibility
        timeout's span), never less than behind a job of the default timeout."""
        return max(type(self).job_timeout, self.job_timeout) + 2 * HARD_LIMIT_MARGIN

    @property
    def admission_stale(self) -> float:
        """How long an admitted batch chunk may go unfinished before its room is given back: every
        delivery it may have had has met its hard time limit by then."""
        return self.visibility_timeout * (self.max_deliveries + 1)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> QueueSettings:
        return cls(
            redis_url=_redis_url(environ, "LOCALQ_REDIS_URL", DEFAULT_REDIS_URL),
            job_ttl=positive_number(environ, "LOCALQ_JOB_TTL", cls.job_ttl),
            job_timeout=positive_number(environ, "LOCALQ_JOB_TIMEOUT", cls.job_timeout),
            max_deliveries=positive_int(environ, "LOCALQ_MAX_DELIVERIES", cls.max_deliveries),
            resume_grace=positive_number(environ, "LOCALQ_RESUME_GRACE", cls.resume_grace, allow_zero=True),
            resume_window=positive_number(environ, "LOCALQ_RESUME_WINDOW", cls.resume_window),
            generated_ttl=positive_number(environ, "LOCALQ_GENERATED_TTL", cls.generated_ttl),
            response_ttl=positive_number(environ, "LOCALQ_RESPONSE_TTL", cls.response_ttl),
            files_dir=_directory(environ, "LOCALQ_FILES_DIR", cls.files_dir),
            max_file_bytes=positive_int(environ, "LOCALQ_MAX_FILE_BYTES", cls.max_file_bytes),
            max_batch_file_bytes=positive_int(environ, "LOCALQ_MAX_BATCH_FILE_BYTES", cls.max_batch_file_bytes),
            batch_sweep_interval=positive_number(environ, "LOCALQ_BATCH_SWEEP_INTERVAL", cls.batch_sweep_interval),
            models_dir=_directory(environ, "LOCALQ_MODELS_DIR", cls.models_dir),
            batch_admit=optional_positive_int(environ, "LOCALQ_BATCH_ADMIT"),
            fair_lag=positive_number(environ, "LOCALQ_FAIR_LAG", cls.fair_lag, allow_zero=True),
        )


def positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    """A positive integer variable, so a typo stops start-up instead of misbehaving."""
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def optional_positive_int(environ: Mapping[str, str], name: str) -> int | None:
    """A positive integer variable that may be left unset (blank counts as unset)."""
    if not environ.get(name, "").strip():
        return None
    return positive_int(environ, name, 0)


def positive_number(environ: Mapping[str, str], name: str, default: float, allow_zero: bool = False) -> float:
    """A positive, finite number (of seconds, mostly); a typo stops start-up instead of misbehaving."""
    raw = environ.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a positive number, got {raw!r}")
    return value


def _redis_url(environ: Mapping[str, str], name: str, default: str) -> str:
    """A URL redis-py and Celery accept; blank counts as unset."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    parts = urlsplit(raw)
    if parts.scheme not in REDIS_URL_SCHEMES:
        raise ValueError(
            f"{name} must be a redis://, rediss://, unix:// or sentinel:// URL, got {redacted(raw)!r}"
        )
    if parts.scheme == "sentinel":
        try:
            parse_sentinel_url(raw)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        return raw
    if parts.scheme in ("redis", "rediss"):
        try:
            parts.port  # noqa: B018 - raises on a non-numeric port
        except ValueError:
            raise ValueError(f"{name} has an invalid port: {redacted(raw)!r}") from None
        if not parts.hostname:
            raise ValueError(f"{name} names no host: {redacted(raw)!r}")
    return raw


def _directory(environ: Mapping[str, str], name: str, default: Path) -> Path:
    """A folder (created on first use, so it need not exist yet); blank counts as unset."""
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if "\x00" in raw:
        raise ValueError(f"{name} must be a folder path, got {raw!r}")
    path = Path(raw).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} must be a folder, but {path} is not one")
    return path
