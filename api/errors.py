"""OpenAI-shaped errors: every failure a client sees is `{"error": {message, type, param, code}}`.

Handlers are installed for our own `APIError`, for the HTTP errors Werkzeug raises while routing
(404, 405, 413, 415, 400) and for anything unexpected, so that no traceback ever reaches a client.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# The `type` OpenAI uses for each status we answer with.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    415: "invalid_request_error",
    417: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An error to answer with; raise it anywhere inside a request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(err: APIError):
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
        return error_response(APIError(503, "The job queue is unavailable; retry later.", code="queue_unavailable",
                                       headers={"Retry-After": "5"}))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(
            APIError(500, "The server had an error while processing your request.", type="server_error")
        )
