"""Validate a Batch API input file before any of its work starts.

Every line must be a JSON object with a unique `custom_id`, `method` POST, a `url` equal to the
batch's endpoint, and a `body` that validates against that endpoint's generated request schema
(`stream: true` refused). Errors carry OpenAI's batch error shape: `line` (1-based), `code`,
`message`, `param`. The file is read line by line, never whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from schemas.errors import Invalid
from schemas.generated import OPERATIONS
from schemas.requests import validate
from workers.defaults import DEFAULT_IMAGE_MODEL

MAX_LINES = 50_000
# Endpoints a batch may target, as `/v1/...` URLs.
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/images/generations",
                   "/v1/responses")
# the model a line runs on when its body names none, as the synchronous endpoint does
DEFAULT_MODELS = {"/v1/images/generations": DEFAULT_IMAGE_MODEL}


@dataclass(frozen=True)
class BatchLine:
    line: int
    custom_id: str
    body: dict


@dataclass
class BatchInput:
    lines: list[BatchLine] = field(default_factory=list)
    errors: list[dict] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.errors and bool(self.lines)


def _operation(url: str) -> dict:
    path = url.removeprefix("/v1")
    return next(op for op in OPERATIONS if op["method"] == "POST" and op["path"] == path and not op["query"])


def _error(line: int | None, code: str, message: str, param: str | None = None) -> dict:
    return {"line": line, "code": code, "message": message, "param": param}


def check_lines(raw_lines: Iterable[bytes | str], endpoint: str,
                model_problem: Callable[[str, dict], tuple[str, str] | None] | None = None,
                max_lines: int = MAX_LINES) -> BatchInput:
    """Check every line; `model_problem(model, body)` may refuse a body the server cannot run
    (an unknown model, a parameter its backend cannot honour) as (code, message)."""
    operation = _operation(endpoint)
    schema = operation["request"]["application/json"]
    result = BatchInput()
    seen: dict[str, int] = {}
    count = 0
    for number, raw in _numbered(raw_lines):
        count += 1
        if count > max_lines:
            result.errors.append(_error(number, "too_many_lines",
                                        f"A batch input file may hold at most {max_lines} requests."))
            break
        line = _check_line(number, raw, endpoint, schema, operation["extensions"], seen, model_problem,
                           result.errors)
        if line is not None:
            result.lines.append(line)
    if count == 0:
        result.errors.append(_error(None, "empty_file", "The batch input file holds no requests."))
    return result


def _numbered(raw_lines: Iterable[bytes | str]) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every non-blank line."""
    for number, raw in enumerate(raw_lines, start=1):
        text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
        if text.strip():
            yield number, text


def _check_line(number: int, text: str, endpoint: str, schema: str, extensions: Any, seen: dict[str, int],
                model_problem, errors: list[dict]) -> BatchLine | None:
    try:
        item = json.loads(text)
    except (ValueError, RecursionError):
        errors.append(_error(number, "invalid_json_line", "This line is not valid JSON."))
        return None
    if not isinstance(item, dict):
        errors.append(_error(number, "invalid_json_line", "Each line must be a JSON object."))
        return None
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        errors.append(_error(number, "missing_custom_id", "Each line needs a non-empty string 'custom_id'.",
                             "custom_id"))
        return None
    if custom_id in seen:
        errors.append(_error(number, "duplicate_custom_id",
                             f"The custom_id '{custom_id}' is already used on line {seen[custom_id]}.", "custom_id"))
        return None
    seen[custom_id] = number
    unknown = sorted(set(item) - {"custom_id", "method", "url", "body"})
    if unknown:
        errors.append(_error(number, "invalid_request", f"Unrecognized field '{unknown[0]}' on a batch line.",
                             unknown[0]))
        return None
    if item.get("method") != "POST":
        errors.append(_error(number, "invalid_method", "The method of every line must be POST.", "method"))
        return None
    if item.get("url") != endpoint:
        errors.append(_error(number, "mismatched_url",
                             f"The url of every line must be the batch's endpoint, {endpoint}.", "url"))
        return None
    body = item.get("body")
    try:
        body = validate(schema, body, extensions=extensions)
    except Invalid as err:
        errors.append(_error(number, err.code or "invalid_request", err.message,
                             f"body.{err.param}" if err.param else "body"))
        return None
    if body.get("stream"):
        errors.append(_error(number, "invalid_request", "Streaming is not available in a batch.", "body.stream"))
        return None
    if body.get("model") is None and endpoint in DEFAULT_MODELS:
        body = {**body, "model": DEFAULT_MODELS[endpoint]}
    if model_problem is not None:
        problem = model_problem(body.get("model"), body)
        if problem is not None:
            code, message = problem
            errors.append(_error(number, code, message, "body.model"))
            return None
    return BatchLine(number, custom_id, body)
