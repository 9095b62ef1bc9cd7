"""OpenAI Files: the bytes on disk under one folder, the metadata in Redis, both kept until deleted.

Used by the API (`/v1/files`) and by workers (a batch writes its output and error files here), so
it depends on nothing but redis-py and the standard library. Layout:

* `<root>/<file id>`: the bytes. A file is written to a temporary name in the same folder, fsynced
  and renamed into place, so a crash never leaves a half file under a real id.
* `localq:file:<id>`: a hash with the OpenAI file object's fields, written after the bytes.
* `localq:files`: every file id, scored by creation time (the list order); `localq:files:purpose:<p>`
  the same per purpose; `localq:files:expiring`: files with an `expires_at`, scored by it.
* `localq:files:project:<project id>` (and `...:purpose:<p>`): the same indexes for one project.

Ownership: a file belongs to the project of the key that created it (`project`, "" on a server
without keys). Every reading and deleting call takes `project`: a file of another project is
"not found", exactly as an unknown id, so nobody learns it exists. `project=None` means every
project (the server's own housekeeping: the sweeper, a batch worker reading its input).

None of these keys has a TTL, so with Redis's append-only file a restart loses nothing. A file whose
`expires_at` has passed is treated as gone and removed the next time anyone looks.

Every id that comes from outside is checked against `FILE_ID` before it is used in a key or a path;
an id that does not match is simply "not found".
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

import redis

FILE_ID = re.compile(r"file-[A-Za-z0-9_-]{24,64}")
INDEX_KEY = "localq:files"
EXPIRING_KEY = "localq:files:expiring"
CHUNK = 1024 * 1024
TMP_PREFIX = ".upload-"

#: Purposes a client may upload with (OpenAI's CreateFileRequest enum).
CLIENT_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
#: Purposes only localq itself writes (outputs of batches and the like).
SYSTEM_PURPOSES = frozenset({"assistants_output", "batch_output", "fine-tune-results"})
PURPOSES = CLIENT_PURPOSES | SYSTEM_PURPOSES


class FileTooLarge(Exception):
    """The source held more than `max_bytes`; nothing was stored."""

    def __init__(self, limit: int):
        super().__init__(f"file is larger than {limit} bytes")
        self.limit = limit


class FileNotFound(LookupError):
    """No such file: the id is malformed, unknown, deleted or expired."""


def file_key(file_id: str) -> str:
    return f"localq:file:{file_id}"


def purpose_key(purpose: str) -> str:
    return f"{INDEX_KEY}:purpose:{purpose}"


def project_index(project: str, purpose: str | None = None) -> str:
    """The list index of one project's files (of one purpose); "" (no keys) lists the whole server."""
    base = f"{INDEX_KEY}:project:{project}" if project else INDEX_KEY
    return f"{base}:purpose:{purpose}" if purpose else base


def new_file_id() -> str:
    return "file-" + secrets.token_urlsafe(18)  # 24 url-safe characters


def valid_file_id(file_id: Any) -> bool:
    return isinstance(file_id, str) and FILE_ID.fullmatch(file_id) is not None


class FileStore:
    """Files for one Redis (decode_responses=True) and one folder; safe to share between threads."""

    def __init__(self, client: redis.Redis, root: Path | str):
        self.client = client
        self.root = Path(root)

    # -- writing ---------------------------------------------------------------------------------

    def create(
        self,
        *,
        purpose: str,
        filename: str,
        source: bytes | IO[bytes] | Iterable[bytes],
        max_bytes: int | None = None,
        expires_after: int | None = None,
        project: str = "",
    ) -> dict:
        """Store `source` (bytes, a binary file object read in chunks, or an iterable of byte chunks)
        and return the new OpenAI file object. Raises FileTooLarge past `max_bytes` (nothing kept).

        `expires_after`: seconds after creation at which the file is gone (OpenAI's `expires_after`
        with anchor `created_at`); None keeps it until it is deleted. `project`: who owns it."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown file purpose {purpose!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = new_file_id()
        final = self.root / file_id
        size = self._write(final, source, max_bytes)
        created = time.time()
        record = {
            "id": file_id,
            "bytes": str(size),
            "created_at": str(int(created)),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "project": project,
        }
        expires_at = None if expires_after is None else int(created) + int(expires_after)
        if expires_at is not None:
            record["expires_at"] = str(expires_at)
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(file_key(file_id), mapping=record)
            pipe.zadd(INDEX_KEY, {file_id: created})
            pipe.zadd(purpose_key(purpose), {file_id: created})
            if project:
                pipe.zadd(project_index(project), {file_id: created})
                pipe.zadd(project_index(project, purpose), {file_id: created})
            if expires_at is not None:
                pipe.zadd(EXPIRING_KEY, {file_id: expires_at})
            pipe.execute()
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return file_object(record)

    def _write(self, final: Path, source, max_bytes: int | None) -> int:
        """Copy `source` to a temporary file next to `final`, fsync it, rename it; its size."""
        tmp = self.root / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        size = 0
        try:
            with open(tmp, "xb") as out:
                for chunk in _chunks(source):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)
        return size

    def delete(self, file_id: str, project: str | None = None) -> bool:
        """Remove the metadata, then the bytes; False if there was no such file (in `project`)."""
        record = self._record(file_id, project)
        if record is None:
            return False
        return self._remove(file_id, record)

    def _remove(self, file_id: str, record: dict) -> bool:
        purpose, project = record.get("purpose", ""), record.get("project", "")
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(file_key(file_id))
        pipe.zrem(INDEX_KEY, file_id)
        if purpose:
            pipe.zrem(purpose_key(purpose), file_id)
        if project:
            pipe.zrem(project_index(project), file_id)
            if purpose:
                pipe.zrem(project_index(project, purpose), file_id)
        pipe.zrem(EXPIRING_KEY, file_id)
        existed = bool(pipe.execute()[0])
        (self.root / file_id).unlink(missing_ok=True)  # open readers keep reading (POSIX)
        return existed

    def purge_expired(self, now: float | None = None) -> int:
        """Delete every file whose `expires_at` has passed; how many went."""
        now = time.time() if now is None else now
        due = self.client.zrangebyscore(EXPIRING_KEY, "-inf", now)
        for file_id in due:
            purpose, project = self.client.hmget(file_key(file_id), "purpose", "project")
            self._remove(file_id, {"purpose": purpose or "", "project": project or ""})
        return len(due)

    # -- reading ---------------------------------------------------------------------------------

    def get(self, file_id: str, project: str | None = None) -> dict | None:
        """The OpenAI file object, or None (malformed, unknown, deleted, expired, another project's)."""
        record = self._record(file_id, project)
        return None if record is None else file_object(record)

    def _record(self, file_id: str, project: str | None = None) -> dict | None:
        if not valid_file_id(file_id):
            return None
        record = self.client.hgetall(file_key(file_id))
        if not record:
            return None
        if _expired(record, time.time()):
            self._remove(file_id, record)
            return None
        if project is not None and record.get("project", "") != project:
            return None
        return record

    def list(
        self, purpose: str | None = None, limit: int = 10000, after: str | None = None, order: str = "desc",
        project: str = "",
    ) -> tuple[list[dict], bool]:
        """A page of file objects, newest first by default, and whether more follow: the files of
        `project` ("" lists every file, as a server without keys does).

        `after` is the id of the last file of the previous page; an unknown one raises FileNotFound.
        """
        if order not in ("asc", "desc"):
            raise ValueError(f"order must be asc or desc, got {order!r}")
        if limit < 1:
            raise ValueError("limit must be positive")
        self.purge_expired()
        index = project_index(project, purpose)
        start = 0
        if after is not None:
            rank = self._rank(index, after, order) if valid_file_id(after) else None
            if rank is None:
                raise FileNotFound(after)
            start = rank + 1
        items: list[dict] = []
        now = time.time()
        while True:
            want = limit + 1 - len(items)
            ids = self._range(index, start, start + max(want, 100) - 1, order)
            if not ids:
                break
            start += len(ids)
            pipe = self.client.pipeline(transaction=False)
            for file_id in ids:
                pipe.hgetall(file_key(file_id))
            for record in pipe.execute():
                if record and not _expired(record, now):
                    items.append(file_object(record))
            if len(items) > limit:
                break
        return items[:limit], len(items) > limit

    def _rank(self, index: str, file_id: str, order: str) -> int | None:
        return (self.client.zrank if order == "asc" else self.client.zrevrank)(index, file_id)

    def _range(self, index: str, start: int, stop: int, order: str) -> list[str]:
        return (self.client.zrange if order == "asc" else self.client.zrevrange)(index, start, stop)

    def path(self, file_id: str, project: str | None = None) -> Path:
        """Where a stored file's bytes are; FileNotFound if there is no such file (in `project`)."""
        if self._record(file_id, project) is None:
            raise FileNotFound(file_id)
        path = self.root / file_id
        if not path.is_file():
            raise FileNotFound(file_id)
        return path

    def open(self, file_id: str, project: str | None = None) -> IO[bytes]:
        """The stored bytes, opened for reading; FileNotFound if there is no such file (in `project`)."""
        path = self.path(file_id, project)
        try:
            return open(path, "rb")
        except FileNotFoundError:
            raise FileNotFound(file_id) from None


def file_object(record: dict) -> dict:
    """The OpenAI file object of a metadata hash. `expires_at` and `status_details` are left out
    when unset: OpenAI's schema types them as an integer and a string, never null."""
    found = {
        "id": record["id"],
        "object": "file",
        "bytes": int(record.get("bytes", 0)),
        "created_at": int(record.get("created_at", 0)),
        "filename": record.get("filename", ""),
        "purpose": record.get("purpose", ""),
        "status": record.get("status", "processed"),
    }
    if record.get("expires_at"):
        found["expires_at"] = int(record["expires_at"])
    if record.get("status_details"):
        found["status_details"] = record["status_details"]
    return found


def _expired(record: dict, now: float) -> bool:
    expires_at = record.get("expires_at")
    return bool(expires_at) and int(expires_at) <= now


def _chunks(source) -> Iterable[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for offset in range(0, len(view), CHUNK):
            yield view[offset:offset + CHUNK]
        return
    read = getattr(source, "read", None)
    if read is not None:
        while chunk := read(CHUNK):
            yield chunk
        return
    for chunk in source:
        if chunk:
            yield chunk


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
