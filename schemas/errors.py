"""Turn marshmallow's nested error dicts into OpenAI's one message with a `param` path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.runtime import PARAM


@dataclass
class Invalid(Exception):  # not frozen: raising sets __traceback__ on it
    """A request value that failed validation: `param` is its path, as OpenAI writes it."""

    param: str | None
    message: str
    code: str | None = None

    def __str__(self) -> str:
        return self.message


def join_path(path: tuple) -> str | None:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "_schema":
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


def leaves(messages: Any, path: tuple = ()) -> list[tuple[tuple, str]]:
    """Every (path, message) pair in a marshmallow error structure, in the order it was found."""
    if isinstance(messages, dict):
        found = []
        for key, sub in messages.items():
            found.extend(leaves(sub, path + (key,)))
        return found
    if isinstance(messages, list):
        found = []
        for item in messages:
            found.extend(leaves(item, path))
        return found
    return [(path, str(messages))]


def first_error(messages: Any, prefix: tuple = ()) -> Invalid:
    path, message = leaves(messages, prefix)[0]
    param = join_path(path)
    quoted = f"'{param}'" if param else "the request body"
    return Invalid(param, message.replace(PARAM, quoted) if PARAM in message else message, code_for(message))


# OpenAI's error codes for each kind of message the runtime writes.
_CODES = (
    ("Missing required parameter", "missing_required_parameter"),
    ("Unrecognized request argument", "unknown_parameter"),
    ("Invalid type", "invalid_type"),
)


def code_for(message: str) -> str:
    for prefix, code in _CODES:
        if message.startswith(prefix):
            return code
    return "invalid_value"


UNKNOWN_MARK = "Unrecognized request argument supplied"


def unknown_field_paths(messages: Any) -> list[tuple]:
    """Paths of the fields a client sent that the schema does not know."""
    return [path for path, message in leaves(messages) if message.startswith(UNKNOWN_MARK)]
