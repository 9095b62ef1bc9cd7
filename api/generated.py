"""`GET /generated/<name>`: files jobs produced for `url` responses (images, audio).

Names are unguessable and expire (LOCALQ_GENERATED_TTL), like OpenAI's image URLs, so the route
sits outside `/v1` and needs no key: an `<img src>` or a plain download works. Each file belongs
to the project whose job made it; on a server with keys, a request that presents another
project's key (or a key nobody issued) is answered 404, as if the name did not exist.
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, request

from api.auth import keys_configured, presented_key, presented_tenant
from api.errors import APIError
from api.queue import queue_runtime
from store.files import GENERATED_PATH, generated_file, generated_folder

blueprint = Blueprint("generated", __name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.[a-z0-9]{2,5}$")


@blueprint.get(f"/{GENERATED_PATH}/<name>")
def generated(name: str):
    folder = generated_folder(queue_runtime().settings.files_dir)
    found = generated_file(queue_runtime().redis, name, folder) if _NAME.match(name) else None
    if found is None or not _may_read(owner=found[2]):
        raise APIError(404, "This file does not exist or has expired.", code="file_not_found")
    data, media_type, _ = found
    return Response(data, mimetype=media_type, headers={"Cache-Control": "private, max-age=3600"})


def _may_read(owner: str) -> bool:
    """Whoever holds the URL, unless the request speaks for a project other than the owner."""
    if presented_key(request.headers) is None or not keys_configured():
        return True
    tenant = presented_tenant()
    return tenant is not None and tenant.project_id == owner
