"""The web console: a page at `/` for browsers, with its own static files, and nothing else.

The console is plain HTML, CSS and JavaScript modules written in this folder (no build step, no
CDN): everything it shows it reads from localq's public HTTP API with the key the person typed,
so it can do nothing that key could not do with curl. An API client asking for `/` (no HTML in
its Accept header) gets the usual 404, as before.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory

from api.errors import APIError

STATIC = Path(__file__).resolve().parent / "static"

blueprint = Blueprint("console", __name__)

#: Only this server's own scripts, styles and API; images and audio the page makes itself
#: (data: and blob: URLs); no framing by other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; "
                               "connect-src 'self'; script-src 'self'; style-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def wants_html() -> bool:
    """A browser's navigation names text/html; curl sends */* and the OpenAI SDK application/json."""
    named = dict(request.accept_mimetypes)  # the media types as sent, with their qualities
    html = named.get("text/html", 0)
    return html > 0 and html >= named.get("application/json", 0)


@blueprint.get("/")
def index():
    if not wants_html():
        raise APIError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    return _secured(send_from_directory(STATIC, "index.html", max_age=0))


@blueprint.get("/console/<path:filename>")
def asset(filename: str):
    """The console's CSS, scripts and icons; revalidated on each load so an upgrade shows at once."""
    return _secured(send_from_directory(STATIC, filename, max_age=0))


def _secured(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response
