"""Process settings, read once from the environment so every part agrees."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from store.rate_limits import Limits
from tasks.settings import DEFAULT_MODELS_DIR, QueueSettings, optional_positive_int, positive_int, positive_number

UNKNOWN_FIELDS_CHOICES = ("reject", "ignore")


@dataclass(frozen=True)
class Settings:
    """Everything the API process is configured by; built by `from_env`."""

    #: Model configs the API lists and routes by (`queue.models_dir`, unless `--models-dir` overrides both).
    models_dir: Path = DEFAULT_MODELS_DIR
    unknown_fields: str = "reject"
    max_request_bytes: int = 64 * 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8080
    #: Broker, job store and job limits: the part of the settings the workers read too.
    queue: QueueSettings = field(default_factory=QueueSettings)
    #: Keys accepted on `/v1`; empty means the API is open.
    api_keys: frozenset[str] = frozenset()
    #: Origins allowed to call `/v1` from a browser; empty means CORS is off.
    cors_origins: tuple[str, ...] = ()
    #: Jobs waiting per queue before new submissions are refused.
    max_queue_depth: int = 256
    #: Seconds between SSE keep-alive comments on an idle stream.
    keepalive_interval: float = 15.0
    #: Seconds the API waits for the next piece of a request body before answering 408: a client
    #: that sends headers and then stalls must not hold its connection for ever.
    body_read_timeout: float = 10.0
    #: Seconds a stream or a wait for a job's result keeps trying while Redis is away (stalled,
    #: restarting), from its first failed read; 0: not at all (`api.sse.relay`).
    relay_ride_over: float = 30.0
    #: Seconds the API's view of the live workers (which holder is idle, for routing) may be old
    #: before a request starts a refresh; 0: read on every model call (three round trips).
    workers_max_age: float = 1.0
    #: Tests and experiments: seconds every batch gets as its completion window instead of the one
    #: it asked for (24h); None: the requested window.
    batch_window: int | None = None
    #: Server-wide rate limits of every project (LOCALQ_RATE_LIMIT_RPM, LOCALQ_RATE_LIMIT_TPM,
    #: LOCALQ_BATCH_TOKENS_PER_DAY); unset: none, unless a project has its own (`store.rate_limits`).
    rate_limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read `LOCALQ_*` variables; a malformed value raises ValueError naming it."""
        unknown_fields = environ.get("LOCALQ_UNKNOWN_FIELDS", cls.unknown_fields)
        if unknown_fields not in UNKNOWN_FIELDS_CHOICES:
            raise ValueError(
                f"LOCALQ_UNKNOWN_FIELDS must be one of {', '.join(UNKNOWN_FIELDS_CHOICES)}, "
                f"got {unknown_fields!r}"
            )
        queue = QueueSettings.from_env(environ)
        return cls(
            models_dir=queue.models_dir,  # read once; `localq --models-dir` overrides this copy
            unknown_fields=unknown_fields,
            max_request_bytes=positive_int(environ, "LOCALQ_MAX_REQUEST_BYTES", cls.max_request_bytes),
            host=environ.get("LOCALQ_HOST", cls.host),
            port=positive_int(environ, "LOCALQ_PORT", cls.port),
            queue=queue,
            api_keys=_api_keys(environ),
            cors_origins=_origins(environ, "LOCALQ_CORS_ORIGINS"),
            max_queue_depth=positive_int(environ, "LOCALQ_MAX_QUEUE_DEPTH", cls.max_queue_depth),
            keepalive_interval=positive_number(environ, "LOCALQ_SSE_KEEPALIVE", cls.keepalive_interval),
            body_read_timeout=positive_number(environ, "LOCALQ_BODY_READ_TIMEOUT", cls.body_read_timeout),
            relay_ride_over=positive_number(environ, "LOCALQ_RELAY_RIDE_OVER", cls.relay_ride_over,
                                            allow_zero=True),
            workers_max_age=positive_number(environ, "LOCALQ_WORKERS_MAX_AGE", cls.workers_max_age,
                                            allow_zero=True),
            batch_window=optional_positive_int(environ, "LOCALQ_BATCH_WINDOW"),
            rate_limits=Limits.from_env(environ),
        )


def _api_keys(environ: Mapping[str, str]) -> frozenset[str]:
    """Keys from LOCALQ_API_KEYS (comma-separated) and LOCALQ_API_KEYS_FILE (one per line), merged."""
    keys: set[str] = set()
    raw = environ.get("LOCALQ_API_KEYS", "")
    if raw.strip():
        listed = [key.strip() for key in raw.split(",") if key.strip()]
        if not listed:
            raise ValueError("LOCALQ_API_KEYS lists no key (expected comma-separated keys)")
        keys.update(_check_key("LOCALQ_API_KEYS", key) for key in listed)
    path = environ.get("LOCALQ_API_KEYS_FILE", "").strip()
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"LOCALQ_API_KEYS_FILE: cannot read {path}: {exc}") from None
        listed = []
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                listed.append(line)
        if not listed:
            # A keys file that was meant to lock the API but holds no key must not open it.
            raise ValueError(f"LOCALQ_API_KEYS_FILE: {path} contains no key")
        keys.update(_check_key(f"LOCALQ_API_KEYS_FILE ({path})", key) for key in listed)
    return frozenset(keys)


def _check_key(source: str, key: str) -> str:
    """Keys travel in HTTP headers: printable ASCII, no spaces, no commas."""
    if not all("!" <= ch <= "~" for ch in key) or "," in key:
        raise ValueError(
            f"{source}: an API key may only hold printable ASCII characters without spaces "
            f"or commas (one key is {len(key)} characters long and holds something else)"
        )
    return key


def _origins(environ: Mapping[str, str], name: str) -> tuple[str, ...]:
    """`*` or `scheme://host[:port]` origins, as browsers send them in the Origin header."""
    raw = environ.get(name, "")
    origins: list[str] = []
    for item in raw.split(","):
        origin = item.strip()
        if not origin:
            continue
        if origin != "*":
            parts = urlsplit(origin)
            try:
                parts.port  # noqa: B018
            except ValueError:
                raise ValueError(f"{name}: invalid port in origin {origin!r}") from None
            if (
                parts.scheme not in ("http", "https")
                or not parts.hostname
                or parts.path not in ("", "/")
                or parts.query
                or parts.fragment
                or parts.username
            ):
                raise ValueError(
                    f"{name}: {origin!r} is not an origin; expected '*' or scheme://host[:port], "
                    "e.g. http://localhost:3000"
                )
            origin = origin.rstrip("/")
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)
