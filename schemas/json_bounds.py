"""Bounds every decoded request value must keep before anything else looks at it.

A JSON value that validation accepts travels on: into a Celery message that the worker pickles
to hand to its pool process, into grammar converters, templates and tokenizers. Each of those
recurses or encodes, so two things are refused here, once, for bodies, form fields, query
strings and batch lines alike:

- nesting deeper than `MAX_DEPTH` levels of objects and arrays (a 500-deep `json_schema` once
  passed validation and then crashed the worker pickling it; nothing localq serves needs more
  than a few levels, and OpenAI's structured outputs allow 10);
- strings (values or keys) holding a lone UTF-16 surrogate (`"\\ud800"` is valid JSON but not
  text: it cannot be encoded as UTF-8, so a tokenizer or a Redis write would fail on it).

The walk is iterative, so a value of any depth is checked without recursion. Sizes are bounded
before this, by the body limit (`LOCALQ_MAX_REQUEST_BYTES`) and each field's schema.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from schemas.errors import Invalid, join_path

MAX_DEPTH = 64


def check_bounds(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raise `Invalid` naming the first value too deeply nested or holding a lone surrogate."""
    stack: list[tuple[Any, tuple, int]] = [(value, (), 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
            continue
        if isinstance(item, Mapping):
            children = item.items()
        elif isinstance(item, list | tuple):
            children = enumerate(item)
        else:
            continue
        if depth >= max_depth:
            raise _too_deep(path, max_depth)
        pending = []
        for key, child in children:
            if isinstance(key, str):
                _check_text(key, path + (key,))
            pending.append((child, path + (key,), depth + 1))
        stack.extend(reversed(pending))  # first child checked first: errors name the earliest value


def _check_text(text: str, path: tuple) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        param = join_path(path)
        where = f"'{param}'" if param else "the request body"
        code_point = ord(text[err.start])
        raise Invalid(
            param,
            f"Invalid value for {where}: the string is not valid Unicode text "
            f"(it holds a lone surrogate, U+{code_point:04X}, at character {err.start}).",
            "invalid_value",
        ) from None


def _too_deep(path: tuple, max_depth: int) -> Invalid:
    # name the top-level parameter: the full path of a deep value is as long as the value is deep
    param = join_path(path[:1])
    where = f"'{param}'" if param else "the request body"
    return Invalid(
        param,
        f"Invalid value for {where}: it is nested too deeply; at most {max_depth} levels of objects and "
        "arrays are accepted.",
        "invalid_value",
    )
