"""Process settings, read once from the environment so every part agrees."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

#: The `models/` folder that ships next to the packages in a source checkout.
DEFAULT_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
UNKNOWN_FIELDS_CHOICES = ("reject", "ignore")


@dataclass(frozen=True)
class Settings:
    """Everything the API process is configured by; built by `from_env`."""

    models_dir: Path = DEFAULT_MODELS_DIR
    unknown_fields: str = "reject"
    max_request_bytes: int = 64 * 1024 * 1024
    host: str = "127.0.0.1"
    port: int = 8080

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """Read `LOCALQ_*` variables; a malformed value raises ValueError naming it."""
        unknown_fields = environ.get("LOCALQ_UNKNOWN_FIELDS", cls.unknown_fields)
        if unknown_fields not in UNKNOWN_FIELDS_CHOICES:
            raise ValueError(
                f"LOCALQ_UNKNOWN_FIELDS must be one of {', '.join(UNKNOWN_FIELDS_CHOICES)}, "
                f"got {unknown_fields!r}"
            )
        return cls(
            models_dir=Path(environ.get("LOCALQ_MODELS_DIR", cls.models_dir)),
            unknown_fields=unknown_fields,
            max_request_bytes=_int(environ, "LOCALQ_MAX_REQUEST_BYTES", cls.max_request_bytes),
            host=environ.get("LOCALQ_HOST", cls.host),
            port=_int(environ, "LOCALQ_PORT", cls.port),
        )


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
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
