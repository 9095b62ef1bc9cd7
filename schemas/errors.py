"""Turn marshmallow's nested error dicts into OpenAI's one message with a `param` path.

The error code comes with each message as data (`schemas.runtime.Message`), never from its wording.
"""

from __future__ import annotations

from typing import Any

from schemas.openai_errors import Invalid
from schemas.runtime import PARAM, UNKNOWN, code_of

__all__ = ["Invalid", "first_error", "join_path", "leaves", "unknown_field_paths"]


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
    """Every (path, message) pair in a marshmallow error structure, in the order it was found;
    a message keeps its own type (and so its code)."""
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
    return [(path, messages if isinstance(messages, str) else str(messages))]


def first_error(messages: Any, prefix: tuple = ()) -> Invalid:
    path, message = leaves(messages, prefix)[0]
    param = join_path(path)
    quoted = f"'{param}'" if param else "the request body"
    return Invalid(param, str(message).replace(PARAM, quoted), code_of(message))


def unknown_field_paths(messages: Any) -> list[tuple]:
    """Paths of the fields a client sent that the schema does not know."""
    return [path for path, message in leaves(messages) if code_of(message) == UNKNOWN]
