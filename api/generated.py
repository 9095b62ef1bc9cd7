"""`GET /generated/<name>`: files jobs produced for `url` responses (images, audio).

Names are unguessable and expire (LOCALQ_GENERATED_TTL), like OpenAI's image URLs, so the route
sits outside `/v1` and needs no key.
"""

from __future__ import annotations

import re

from flask import Blueprint, Response

from api.errors import APIError
from api.queue import queue_runtime
from store.files import GENERATED_PATH, generated_file

blueprint = Blueprint("generated", __name__)

_NAME = re.compile(r"^[A-Za-z0-9_-]{20,64}\.[a-z0-9]{2,5}$")


@blueprint.get(f"/{GENERATED_PATH}/<name>")
def generated(name: str):
    found = generated_file(queue_runtime().blobs, name) if _NAME.match(name) else None
    if found is None:
        raise APIError(404, "This file does not exist or has expired.", code="file_not_found")
    data, media_type = found
    return Response(data, mimetype=media_type, headers={"Cache-Control": "private, max-age=3600"})
