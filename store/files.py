"""Uploads in and generated files out, reachable by any worker and API process.

The API stores each multipart file part of a job in Redis under a key of its own (with the job's
lifetime) and puts a reference in the job's request; the worker's task turns references back into
`UploadedFile`s. Files a job produces for `url` responses (pictures, speech) are large: their bytes
go to the file store's folder (`LOCALQ_FILES_DIR/generated/<name>`, shared by the processes like
batch output files), under an unguessable name; Redis keeps only what serving them needs (media
type, owning project) with the expiry (`LOCALQ_GENERATED_TTL`). The API serves them at
`/generated/<name>`; the batch sweep deletes the bytes of expired ones (`store.spill.purge_older`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
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


def generated_folder(files_dir: Path) -> Path:
    return files_dir / GENERATED_PATH


def publish_outputs(client: redis.Redis, value: Any, url_for: Callable[[str], str], ttl: int,
                    project: str = "", *, folder: Path) -> Any:
    """`value` with every `FileOutput` written to `folder` under a new unguessable name and replaced
    by its URL; each file is recorded as `project`'s, for `ttl` seconds."""
    if isinstance(value, FileOutput):
        extension = value.extension if value.extension in _SAFE_EXTENSIONS else "bin"
        name = f"{secrets.token_urlsafe(24)}.{extension}"
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{name}.part"
        partial.write_bytes(value.data)
        os.replace(partial, folder / name)  # whole or absent: never a half file under its name
        pipe = client.pipeline(transaction=True)  # never a record without its expiry
        pipe.hset(GENERATED_PREFIX + name, mapping={"type": value.media_type, "project": project})
        pipe.expire(GENERATED_PREFIX + name, ttl)
        pipe.execute()
        return url_for(name)
    if isinstance(value, dict):
        return {key: publish_outputs(client, item, url_for, ttl, project, folder=folder) for key, item in value.items()}
    if isinstance(value, list):
        return [publish_outputs(client, item, url_for, ttl, project, folder=folder) for item in value]
    return value


def generated_file(client: redis.Redis, name: str, folder: Path) -> tuple[bytes, str, str] | None:
    """(bytes, media type, owning project) of a generated file, or None once it expired or if it
    never existed."""
    record = {_text(key): _text(item) for key, item in client.hgetall(GENERATED_PREFIX + name).items()}
    if not record:
        return None
    try:
        data = (folder / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    return data, record.get("type") or "application/octet-stream", record.get("project") or ""


def _text(value) -> str | None:
    return value.decode() if isinstance(value, bytes) else value
