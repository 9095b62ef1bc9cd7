"""Audio job kinds (`speech` on piper, `transcription` and `translation` on faster-whisper)."""

from __future__ import annotations

HANDLERS: dict = {}


def unsupported(kind: str, config, request: dict):
    return None
