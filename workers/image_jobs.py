"""Image job kinds (`image`, `image_edit`) on the diffusers backend."""

from __future__ import annotations

HANDLERS: dict = {}


def unsupported(kind: str, config, request: dict):
    return None
