"""Uploads in and generated files out, kept in Redis so that any worker on any machine can reach them.

The API stores each multipart file part of a job under a key of its own and puts a reference in
the job's request; the worker's task turns references back into `UploadedFile`s. Files a job
produces for `url` responses are stored under an unguessable name with an expiry and served by
the API at `/generated/<name>`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import redis

from workers.files import FileOutput, UploadedFile

UPLOAD_MARK = "$upload"
GENERATED_PREFIX = "localq:generated:"
GENERATED_PATH = "generated"
_SAFE_EXTENSIONS = {"png", "jpeg", "jpg", "webp", "mp3", "wav", "flac", "opus", "aac", "pcm"}


def upload_key(job_id: str, index: int) -> str:
    return f"localq:job:{job_id}:upload:{index}"


def store_uploads(client: redis.Redis, job_id: str, request: dict, files: dict[str, list], ttl: int) -> dict:
    """Store each uploaded part and return `request` with references in place of the files.

    `files` maps a field name to the werkzeug FileStorage objects sent under it (one for
    `file`, several for `image[]`); the value keeps the shape the schema validated.
    """
    pipe = client.pipeline(transaction=False)
    counter = 0
    refs: dict[str, Any] = {}
    for name, parts in files.items():
        stored = []
        for part in parts:
            data = part.stream.read()
            key = upload_key(job_id, counter)
            counter += 1
            pipe.set(key, data, ex=ttl)
            stored.append({UPLOAD_MARK: key, "filename": part.filename or "", "content_type": part.mimetype or "",
                           "size": len(data)})
        refs[name] = stored if isinstance(request.get(name), list) else stored[0]
    pipe.execute()
    return {**request, **refs}


def fetch_uploads(client: redis.Redis, value: Any) -> Any:
    """`value` with every upload reference replaced by the `UploadedFile` it names."""
    if isinstance(value, dict):
        if UPLOAD_MARK in value:
            data = client.get(value[UPLOAD_MARK])
            if data is None:
                raise LookupError(f"upload {value[UPLOAD_MARK]} expired before the job ran")
            return UploadedFile(value.get("filename", ""), value.get("content_type", ""), data)
        return {key: fetch_uploads(client, item) for key, item in value.items()}
    if isinstance(value, list):
        return [fetch_uploads(client, item) for item in value]
    return value


def url_maker(base_url: str | None) -> Callable[[str], str]:
    """name -> the URL a generated file is served at, under the API's base URL."""
    base = (base_url or "/").rstrip("/")
    return lambda name: f"{base}/{GENERATED_PATH}/{name}"


def publish_outputs(client: redis.Redis, value: Any, url_for: Callable[[str], str], ttl: int,
                    project: str = "") -> Any:
    """`value` with every `FileOutput` stored under a new unguessable name and replaced by its URL;
    each file is recorded as `project`'s."""
    if isinstance(value, FileOutput):
        extension = value.extension if value.extension in _SAFE_EXTENSIONS else "bin"
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        pipe = client.pipeline(transaction=False)
        pipe.set(GENERATED_PREFIX + name, value.data, ex=ttl)
        pipe.set(GENERATED_PREFIX + name + ":type", value.media_type, ex=ttl)
        if project:
            pipe.set(GENERATED_PREFIX + name + ":project", project, ex=ttl)
        pipe.execute()
        return url_for(name)
    if isinstance(value, dict):
        return {key: publish_outputs(client, item, url_for, ttl, project) for key, item in value.items()}
    if isinstance(value, list):
        return [publish_outputs(client, item, url_for, ttl, project) for item in value]
    return value


def generated_file(client: redis.Redis, name: str) -> tuple[bytes, str, str] | None:
    """(bytes, media type, owning project) of a generated file, or None once it expired or if it
    never existed."""
    pipe = client.pipeline(transaction=False)
    pipe.get(GENERATED_PREFIX + name)
    pipe.get(GENERATED_PREFIX + name + ":type")
    pipe.get(GENERATED_PREFIX + name + ":project")
    data, media_type, project = (_text(value) if index else value for index, value in enumerate(pipe.execute()))
    if data is None:
        return None
    return data, media_type or "application/octet-stream", project or ""


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
