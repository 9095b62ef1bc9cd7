"""Uploaded files are checked here, before anything is queued: present, not empty, not too large,
and of a type the endpoint takes (by content, not by name alone)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from flask import request

from api.errors import APIError


@dataclass(frozen=True)
class UploadRule:
    max_bytes: int
    # accepted kinds: name -> (file name extensions, a test on the first bytes)
    kinds: dict
    label: str


def _is_mp4(head: bytes) -> bool:
    return head[4:8] == b"ftyp"


AUDIO = UploadRule(
    max_bytes=25 * 1024 * 1024,
    kinds={
        "wav": ((".wav",), lambda h: h[:4] == b"RIFF" and h[8:12] == b"WAVE"),
        "flac": ((".flac",), lambda h: h[:4] == b"fLaC"),
        "ogg": ((".ogg", ".oga", ".opus"), lambda h: h[:4] == b"OggS"),
        "mp3": ((".mp3", ".mpga", ".mpeg"), lambda h: h[:3] == b"ID3" or (len(h) > 1 and h[0] == 0xFF
                                                                          and h[1] & 0xE0 == 0xE0)),
        "mp4": ((".mp4", ".m4a"), _is_mp4),
        "webm": ((".webm",), lambda h: h[:4] == b"\x1a\x45\xdf\xa3"),
    },
    label="flac, m4a, mp3, mp4, mpeg, mpga, ogg, wav or webm",
)

IMAGE = UploadRule(
    max_bytes=50 * 1024 * 1024,
    kinds={
        "png": ((".png",), lambda h: h[:8] == b"\x89PNG\r\n\x1a\n"),
        "jpeg": ((".jpg", ".jpeg"), lambda h: h[:3] == b"\xff\xd8\xff"),
        "webp": ((".webp",), lambda h: h[:4] == b"RIFF" and h[8:12] == b"WEBP"),
    },
    label="png, jpeg or webp",
)


def collect(names: tuple[str, ...], rule: UploadRule) -> dict[str, list]:
    """The multipart file parts sent under `names` (`image` or `image[]` alike), each checked."""
    found: dict[str, list] = {}
    for name in names:
        parts = request.files.getlist(name) + request.files.getlist(name + "[]")
        for part in parts:
            check(part, name, rule)
        if parts:
            found[name] = parts
    return found


def check(part, param: str, rule: UploadRule) -> None:
    stream = part.stream
    stream.seek(0, os.SEEK_END)
    size = stream.tell()
    stream.seek(0)
    if size == 0:
        raise APIError(400, f"The uploaded file '{part.filename or param}' is empty.", param=param,
                       code="empty_file")
    if size > rule.max_bytes:
        raise APIError(413, f"The uploaded file is {size} bytes; the limit is {rule.max_bytes} bytes.", param=param,
                       code="file_too_large")
    head = stream.read(16)
    stream.seek(0)
    if not any(test(head) for _, test in rule.kinds.values()):
        raise APIError(400, f"Invalid file format for '{part.filename or param}'. Supported formats: {rule.label}.",
                       param=param, code="invalid_file_format")
