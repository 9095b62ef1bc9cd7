"""`/v1/files`: OpenAI's Files API over `store.filestore.FileStore` (bytes on disk, metadata in Redis).

The body limit of `createFile` (the file limit plus room for the multipart framing) is applied by
`api.operations.BODY_LIMITS` before the body is read; the tighter limit of purpose=batch is checked
while the upload is copied into the store.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from flask import Response, current_app, request
from werkzeug.wsgi import wrap_file

from api.auth import project_scope
from api.errors import APIError
from api.pages import page, page_limit
from api.queue import queue_runtime, setting
from store.filestore import FileNotFound, FileStore, FileTooLarge

MAX_LIST_LIMIT = 10000
MAX_FILENAME = 512


def file_store() -> FileStore:
    """This app's file store, over the queue's Redis and LOCALQ_FILES_DIR; made on first use."""
    extensions = current_app.extensions
    if "localq.files" not in extensions:
        extensions["localq.files"] = FileStore(queue_runtime().redis, setting("queue").files_dir)
    return extensions["localq.files"]


def not_found(file_id: str, param: str = "id") -> APIError:
    return APIError(404, f"No such File object: {file_id}", param=param, code="file_not_found")


def _filename(part) -> str:
    """The upload's own name without any folder part, as OpenAI lists it."""
    name = re.split(r"[/\\]", part.filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:MAX_FILENAME] or "file"


def _size(stream) -> int | None:
    try:
        position = stream.tell()
        size = stream.seek(0, os.SEEK_END)
        stream.seek(position)
        return size
    except (AttributeError, OSError, ValueError):
        return None


def _attachment(filename: str) -> str:
    """Content-Disposition for any name: an ASCII fallback plus the exact UTF-8 name (RFC 6266)."""
    fallback = "".join(ch if " " <= ch <= "~" and ch not in '"\\' else "_" for ch in filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def create_file(call):
    body = call.body
    part = body["file"]
    purpose = body["purpose"]
    filename = _filename(part)
    queue = setting("queue")
    max_bytes = queue.max_file_bytes
    if purpose == "batch":
        if not filename.lower().endswith(".jsonl"):
            raise APIError(400, f"Invalid file format for Batch API: '{filename}'. Must be .jsonl.", param="file",
                           code="invalid_file_format")
        max_bytes = min(max_bytes, queue.max_batch_file_bytes)
    size = _size(part.stream)
    if size == 0:
        raise APIError(400, f"The uploaded file '{filename}' is empty.", param="file", code="empty_file")
    expires_after = body.get("expires_after")
    seconds = expires_after["seconds"] if expires_after else None
    store = file_store()
    try:
        if size is not None and size > max_bytes:
            raise FileTooLarge(max_bytes)
        return store.create(purpose=purpose, filename=filename, source=part.stream, max_bytes=max_bytes,
                            expires_after=seconds, project=project_scope())
    except FileTooLarge as exc:
        which = " for purpose=batch" if purpose == "batch" else ""
        raise APIError(413, f"File '{filename}' is too large: the limit{which} is {exc.limit} bytes.",
                       param="file", code="file_too_large") from None


def list_files(call):
    query = call.query
    limit = page_limit(query, MAX_LIST_LIMIT, MAX_LIST_LIMIT)
    order = query.get("order") or "desc"
    purpose = query.get("purpose") or None
    after = query.get("after") or None
    try:
        items, has_more = file_store().list(purpose=purpose, limit=limit, after=after, order=order,
                                             project=project_scope())
    except FileNotFound:
        raise not_found(after, param="after") from None
    listed = page(items, has_more)
    # ListFilesResponse requires both ids as strings, even on an empty page.
    return {**listed, "first_id": listed["first_id"] or "", "last_id": listed["last_id"] or ""}


def retrieve_file(call):
    file_id = call.path["file_id"]
    found = file_store().get(file_id, project_scope())
    if found is None:
        raise not_found(file_id)
    return found


def delete_file(call):
    file_id = call.path["file_id"]
    if not file_store().delete(file_id, project_scope()):
        raise not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}


def download_file(call):
    """The bytes, streamed from disk in blocks (by the server's sendfile where it has one)."""
    file_id = call.path["file_id"]
    store = file_store()
    found = store.get(file_id, project_scope())
    if found is None:
        raise not_found(file_id)
    try:
        handle = store.open(file_id, project_scope())
    except FileNotFound:
        raise not_found(file_id) from None
    response = Response(wrap_file(request.environ, handle), mimetype="application/octet-stream",
                        direct_passthrough=True)
    response.content_length = os.fstat(handle.fileno()).st_size
    response.headers["Content-Disposition"] = _attachment(found["filename"])
    return response


HANDLERS = {
    "createFile": create_file,
    "listFiles": list_files,
    "retrieveFile": retrieve_file,
    "deleteFile": delete_file,
    "downloadFile": download_file,
}
