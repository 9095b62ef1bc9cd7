"""Reading request bodies safely, whatever the client does while it sends one.

The WSGI server's `wsgi.input` reads the client's socket as the app asks. Left alone, a client that
sends headers and then stops holds its request for as long as it likes, a malformed chunk surfaces
as the server's own exception (a 500), and Werkzeug stops reading a chunked body at the size limit
without saying that more was coming (the truncated JSON then reads as invalid). `BodyGuard` wraps
`wsgi.input` so that each of these is an `APIError` the app answers as OpenAI does:

- 408 `request_timeout` when no piece of the body arrives for `timeout` seconds (an idle bound, as
  nginx's `client_body_timeout`: a large upload on a slow link is fine as long as it keeps coming);
- 400 `invalid_body` for a body the server cannot frame (bad chunk size, missing chunk terminator,
  bad trailer, connection closed inside a chunk);
- 413 `request_too_large` for a body without Content-Length (chunked) that runs past the request's
  limit (`request.max_content_length`), as soon as it does: the rest is never read.

The server closes the connection after a 408 or 400 (the failed read left the body half read).
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import has_request_context, request
from gunicorn.http.errors import NoMoreData, ParseException

from api.errors import APIError


def too_large() -> APIError:
    return APIError(413, "Request body is too large.", code="request_too_large")


class GuardedInput:
    """`wsgi.input` with an idle bound per read (a socket timeout), errors as APIError, and, for a
    body of unknown length, the size limit enforced on what is read."""

    def __init__(self, stream, sock, timeout: float, limited: bool):
        self._stream = stream
        self._sock = sock
        self._timeout = timeout
        self._limited = limited  # no Content-Length: nothing else stops a body at the limit
        self._count = 0
        self._ended = False

    def read(self, size: int | None = -1) -> bytes:
        return self._counted(self._guarded(self._stream.read, size))

    def readline(self, size: int | None = -1) -> bytes:
        return self._counted(self._guarded(self._stream.readline, size))

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _counted(self, data: bytes) -> bytes:
        self._count += len(data)
        if self._limited and not self._ended:
            limit = request.max_content_length if has_request_context() else None
            if limit is not None and self._count >= limit:
                # At the limit: one more byte says whether the body goes on (Werkzeug never asks for it).
                if self._count > limit or self._guarded(self._stream.read, 1):
                    raise too_large()
                self._ended = True
        return data

    def _guarded(self, method, *args):
        sock, previous = self._sock, None
        if sock is not None:
            try:
                previous = sock.gettimeout()
                sock.settimeout(self._timeout)
            except OSError:
                sock = None
        try:
            return method(*args)
        except TimeoutError:
            raise APIError(408, f"The request body stopped arriving: nothing came for {self._timeout:g} seconds.",
                           code="request_timeout") from None
        except (ParseException, NoMoreData):
            raise APIError(400, "The request body is malformed or ended early: its chunked encoding could not "
                           "be read.", code="invalid_body") from None
        finally:
            if sock is not None:
                try:
                    sock.settimeout(previous)
                except OSError:
                    pass


class BodyGuard:
    """WSGI middleware installing `GuardedInput` on every request (see the module docstring)."""

    def __init__(self, app, timeout: float):
        self.app = app
        self.timeout = timeout

    def __call__(self, environ, start_response):
        stream = environ.get("wsgi.input")
        if stream is not None:
            limited = not environ.get("CONTENT_LENGTH")
            environ["wsgi.input"] = GuardedInput(stream, environ.get("gunicorn.socket"), self.timeout, limited)
        return self.app(environ, start_response)
