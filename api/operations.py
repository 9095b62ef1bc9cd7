"""Route every operation of the generated table under `/v1`, validate, then call its handler or 501.

The table comes from the upstream spec plus our overlay, so every OpenAI operation answers: the ones
localq implements through their handler, the rest with an OpenAI-shaped 501 naming the operation.
Bodies are validated before the handler (or the 501) is reached, so a client learns about a bad
request even for an endpoint that is not there yet.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import Flask, current_app, request

from api.errors import APIError
from api.rate_limits import admit
from schemas.errors import Invalid
from schemas.generated import OPERATIONS
from schemas.json_bounds import check_bounds
from schemas.requests import coerce_form, validate

JSON = "application/json"
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
#: Room for a multipart body's boundaries, part headers and text fields around its file.
MULTIPART_ALLOWANCE = 1024 * 1024

#: Body limits that replace the app-wide MAX_CONTENT_LENGTH (LOCALQ_MAX_REQUEST_BYTES) for one
#: operation, computed from the app's settings. Set on the request before its body is touched, so a
#: Content-Length over the limit is answered 413 without a byte of the body being read.
BODY_LIMITS: dict[str, Callable[[Any], int]] = {
    "createFile": lambda settings: settings.queue.max_file_bytes + MULTIPART_ALLOWANCE,
}


@dataclass
class Call:
    """One validated request, as a handler receives it."""

    operation: dict
    body: dict | None = None
    path: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Call], Any]


def flask_rule(path: str) -> str:
    """`/models/{model}` -> `/v1/models/<model>`."""
    return "/v1" + re.sub(r"\{([^}]+)\}", lambda m: f"<{m.group(1)}>", path)


def register_operations(app: Flask, handlers: dict[str, Handler]) -> None:
    unknown = set(handlers) - {op["operation_id"] for op in OPERATIONS}
    if unknown:
        raise ValueError(f"handlers for operations the spec does not have: {sorted(unknown)}")
    by_rule: dict[str, list[dict]] = defaultdict(list)
    for op in OPERATIONS:
        by_rule[flask_rule(op["path"])].append(op)
    for rule, ops in by_rule.items():
        methods = sorted({op["method"] for op in ops})
        app.add_url_rule(rule, endpoint=f"op:{rule}", view_func=_view(ops, handlers), methods=methods)


def _view(ops: list[dict], handlers: dict[str, Handler]):
    # Operations sharing a path and method differ by required query args (`?beta=true`);
    # the most specific match wins.
    ranked = sorted(ops, key=lambda op: -len(op["query"]))

    def view(**path_params):
        method = "GET" if request.method == "HEAD" else request.method  # Flask answers HEAD with the GET view
        op = next(
            op for op in ranked
            if op["method"] == method and all(request.args.get(k) == v for k, v in op["query"].items())
        )
        body_limit = BODY_LIMITS.get(op["operation_id"])
        if body_limit is not None:
            request.max_content_length = body_limit(current_app.config["LOCALQ"])
        call = Call(operation=op, path=path_params, body=read_body(op), query=read_query(op))
        handler = handlers.get(op["operation_id"])
        if handler is None:
            raise APIError(
                501,
                f"{op['method']} /v1{op['path']} ({op['operation_id']}) is not implemented by this localq server.",
                code="not_implemented",
            )
        admit(call)  # rate limits: 429 before anything is queued (api.rate_limits)
        return handler(call)

    return view


def _ignore_unknown() -> bool:
    settings = current_app.config.get("LOCALQ")
    return getattr(settings, "unknown_fields", "reject") == "ignore"


def _invalid(err: Invalid) -> APIError:
    return APIError(400, err.message, param=err.param, code=err.code)


def read_body(op: dict) -> dict | None:
    """Parse and validate the body by its content type; None for operations without a schema."""
    accepted = op["request"]
    if not accepted:
        return None
    mimetype = request.mimetype or ""
    has_body = bool(request.content_length) or request.headers.get("Transfer-Encoding", "").lower() == "chunked"
    if not mimetype and JSON in accepted:
        mimetype = JSON
    if mimetype not in accepted:
        if not has_body and not op["request_required"]:
            return None
        supported = ", ".join(accepted)
        raise APIError(
            415,
            f"Unsupported content type {request.mimetype or '(none)'!r} for {op['method']} /v1{op['path']}; "
            f"send one of: {supported}.",
            code="unsupported_media_type",
        )
    schema_name = accepted[mimetype]
    if mimetype == JSON:
        if not has_body and not op["request_required"]:
            return None
        data = parse_json(request.get_data(cache=True)) if has_body else {}
        if schema_name is None:
            try:
                check_bounds(data)  # unvalidated bodies keep the same bounds as validated ones
            except Invalid as err:
                raise _invalid(err) from None
            return data
        try:
            return validate(schema_name, data, extensions=op["extensions"], ignore_unknown=_ignore_unknown())
        except Invalid as err:
            raise _invalid(err) from None
    if schema_name is None:
        return None
    try:
        data = coerce_form(schema_name, request.form, request.files, extensions=op["extensions"])
        return validate(schema_name, data, extensions=op["extensions"], ignore_unknown=_ignore_unknown())
    except Invalid as err:
        raise _invalid(err) from None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(
            400,
            "We could not parse the JSON body of your request. The API expects a JSON object; "
            "check that the body is valid JSON and that the Content-Type is application/json.",
            code="invalid_json",
        ) from None


def read_query(op: dict) -> dict[str, Any]:
    name = op["query_schema"]
    if not name:
        return request.args.to_dict()
    try:
        return validate(name, coerce_form(name, request.args))
    except Invalid as err:
        raise _invalid(err) from None
