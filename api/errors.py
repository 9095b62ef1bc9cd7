"""OpenAI-shaped errors: every failure a client sees is `{"error": {message, type, param, code}}`.

Handlers are installed for our own `APIError` (the one `schemas.openai_errors.OpenAIError`, so an
error raised by shared code is answered as it is), for the HTTP errors Werkzeug raises while routing
(404, 405, 413, 415, 400) and for anything unexpected, so that no traceback ever reaches a client.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

from schemas.openai_errors import OpenAIError, internal_error, queue_unavailable

log = logging.getLogger(__name__)

# One error type for API, tasks and workers (`schemas.openai_errors`); the API's name for it.
APIError = OpenAIError


def error_response(err: OpenAIError):
    response = jsonify(err.body())
    response.status_code = err.status
    for name, value in err.headers.items():
        response.headers[name] = value
    return response


def _from_http_exception(exc: HTTPException) -> APIError:
    """Translate what Werkzeug raises into OpenAI's wording."""
    from flask import request

    status = exc.code or 500
    if status == 404:
        return APIError(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    if status == 405:
        allowed = getattr(exc, "valid_methods", None) or []
        headers = {"Allow": ", ".join(allowed)} if allowed else None
        return APIError(
            405,
            f"Method {request.method} is not allowed for {request.path}",
            code="method_not_allowed",
            headers=headers,
        )
    if status == 413:
        return APIError(413, "Request body is too large.", code="request_too_large")
    if status == 415:
        return APIError(415, "Unsupported content type.", code="unsupported_media_type")
    if status == 400:
        return APIError(400, "We could not parse the request. Check that it is well-formed.", code="bad_request")
    return APIError(status, exc.description or exc.name)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(err: APIError):
        return error_response(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(_from_http_exception(exc))

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    @app.errorhandler(BrokerError)
    def _queue_down(exc: Exception):
        log.error("job queue unreachable: %s", exc)
        return error_response(queue_unavailable().with_headers({"Retry-After": "5"}))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(internal_error())
