"""OpenAI's usage operations (`GET /v1/organization/usage/...`), over `store.usage`.

`completions`, `embeddings`, `images`, `audio_speeches` and `audio_transcriptions` add up what the
workers recorded per project; `moderations` answers the same shape with empty buckets (localq has
no moderation models). Every one needs an owner key (or a server without keys), like the other
admin operations. The rest of OpenAI's usage family (vector stores, code interpreter sessions,
file and web searches, costs) has nothing to count here and stays a 501.

The query, as OpenAI's: `start_time` (required, Unix seconds, inclusive), `end_time` (exclusive;
default: now), `bucket_width` `1m`, `1h` or `1d` (default), `limit` buckets per page (1m: 60 by
default, at most 1440; 1h: 24, 168; 1d: 7, 31), `page` (the previous answer's `next_page`),
`group_by` and the filters `project_ids`, `models`, `batch` (completions), `sources` and `sizes`
(images). Lists are sent as the key repeated (`group_by=project_id&group_by=model`) or with `[]`.

Buckets are aligned to their width in UTC (minutes, hours, UTC midnights): the first is the one
`start_time` falls in. Every bucket of the range is listed, with `results: []` when nothing was
used; with no `group_by`, a bucket has one result adding up everything; with one, a result per
group. Grouping fields the operation's result has but localq does not group by are null (and are
always null: `user_id`, `api_key_id` and `service_tier`, which localq does not record; filtering
on `user_ids` or `api_key_ids` is refused rather than ignored). `project_id` is the project's id
(`default` on a server without keys); `model` is the model's configured name (an alias counts
under the model it names, and a `models` filter may name either).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable

from flask import current_app, request

from api.auth import require_owner
from api.queue import queue_runtime
from schemas.openai_errors import invalid, unsupported_parameter
from store.usage import (AUDIO_SPEECHES, AUDIO_TRANSCRIPTIONS, CACHED_TOKENS, CHARACTERS, COMPLETIONS, EMBEDDINGS,
                         IMAGES, INPUT_TOKENS, MODERATIONS, OUTPUT_TOKENS, PICTURES, REQUESTS, SECONDS, WIDTHS,
                         Filter, Group, aggregate, bucket_start, read_buckets)

#: Buckets per page, per width: (default, most).
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
DEFAULT_WIDTH = "1d"
IMAGE_SOURCES = ("image.generation", "image.edit", "image.variation")
IMAGE_SIZES = ("256x256", "512x512", "1024x1024", "1792x1792", "1024x1792")
#: Filters of OpenAI's operations that localq cannot honour: it records usage per project, not per key.
UNRECORDED_FILTERS = ("user_ids", "api_key_ids")
PAGE_PREFIX = "page_"


def _values(name: str) -> list[str]:
    """Every value of a list parameter: repeated (`name=a&name=b`) or with brackets (`name[]=a`)."""
    return [value for value in request.args.getlist(name) + request.args.getlist(name + "[]") if value != ""]


def _integer(name: str, required: bool = False) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        if required:
            raise invalid(name, f"Missing required parameter: '{name}'.", "missing_required_parameter")
        return None
    try:
        return int(raw)
    except ValueError:
        raise invalid(name, f"Invalid type for '{name}': expected an integer, but got {raw!r} instead.",
                      "invalid_type") from None


def _choices(name: str, allowed: tuple[str, ...]) -> list[str]:
    values = _values(name)
    for value in values:
        if value not in allowed:
            raise invalid(name, f"Invalid value for '{name}': {value!r}. Supported values are: "
                                f"{', '.join(repr(a) for a in allowed)}.")
    return values


def _boolean(name: str) -> bool | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return None
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise invalid(name, f"Invalid type for '{name}': expected a boolean, but got {raw!r} instead.", "invalid_type")


def _models(names: list[str]) -> frozenset[str] | None:
    """The model names a `models` filter admits: each as given and the configured model it names."""
    if not names:
        return None
    registry = current_app.extensions["localq.models"]
    admitted = set(names)
    for name in names:
        config = registry.resolve(name)
        if config is not None:
            admitted.add(config.name)
    return frozenset(admitted)


def _cursor(width_name: str, start: int) -> str:
    return PAGE_PREFIX + base64.urlsafe_b64encode(f"{width_name}:{start}".encode()).decode().rstrip("=")


def _from_cursor(page: str, width_name: str, width: int, first: int, end: int) -> int:
    """The bucket a `next_page` cursor points at; a 400 for one this query did not give out."""
    try:
        raw = page[len(PAGE_PREFIX):] if page.startswith(PAGE_PREFIX) else "!"
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        named, start = text.split(":")
        start = int(start)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        start, named = None, None
    if named != width_name or start is None or start % width or not first <= start < max(end, first + width):
        raise invalid("page", f"Invalid 'page': {page!r} is not a page of this query; send the `next_page` "
                              "of its previous answer.")
    return start


class Shape:
    """One usage operation: its category, its result object, the groups and filters it offers."""

    def __init__(self, category: str, obj: str, fields: Callable[[dict], dict], group_fields: tuple[str, ...],
                 group_by: tuple[str, ...], batch: bool = False, images: bool = False):
        self.category = category
        self.obj = obj
        self.fields = fields
        self.group_fields = group_fields  # every grouping field of the result, in the schema's order
        self.group_by = group_by  # what `group_by` may name (OpenAI's enum)
        self.batch = batch  # the `batch` filter
        self.images = images  # the `sources` and `sizes` filters

    def result(self, group: Group) -> dict:
        found = {"object": self.obj, **self.fields(group.measures)}
        for name in self.group_fields:
            found[name] = group.key.get(name)
        return found


def _completions(measures: dict) -> dict:
    input_tokens, cached = measures.get(INPUT_TOKENS, 0), measures.get(CACHED_TOKENS, 0)
    return {"input_tokens": input_tokens, "input_cached_tokens": cached,
            "input_uncached_tokens": max(0, input_tokens - cached), "output_tokens": measures.get(OUTPUT_TOKENS, 0),
            "num_model_requests": measures.get(REQUESTS, 0)}


def _measures(**names: str) -> Callable[[dict], dict]:
    def fields(measures: dict) -> dict:
        return {out: measures.get(measure, 0) for out, measure in names.items()}

    return fields


KEY_GROUPS = ("project_id", "user_id", "api_key_id", "model")
SHAPES = {
    "usage-completions": Shape(
        COMPLETIONS, "organization.usage.completions.result", _completions,
        (*KEY_GROUPS, "batch", "service_tier"),
        ("project_id", "user_id", "api_key_id", "model", "batch", "service_tier"), batch=True),
    "usage-embeddings": Shape(
        EMBEDDINGS, "organization.usage.embeddings.result",
        _measures(input_tokens=INPUT_TOKENS, num_model_requests=REQUESTS), KEY_GROUPS, KEY_GROUPS),
    "usage-moderations": Shape(
        MODERATIONS, "organization.usage.moderations.result",
        _measures(input_tokens=INPUT_TOKENS, num_model_requests=REQUESTS), KEY_GROUPS, KEY_GROUPS),
    "usage-images": Shape(
        IMAGES, "organization.usage.images.result", _measures(images=PICTURES, num_model_requests=REQUESTS),
        ("source", "size", *KEY_GROUPS), (*KEY_GROUPS, "size", "source"), images=True),
    "usage-audio-speeches": Shape(
        AUDIO_SPEECHES, "organization.usage.audio_speeches.result",
        _measures(characters=CHARACTERS, num_model_requests=REQUESTS), KEY_GROUPS, KEY_GROUPS),
    "usage-audio-transcriptions": Shape(
        AUDIO_TRANSCRIPTIONS, "organization.usage.audio_transcriptions.result",
        _measures(seconds=SECONDS, num_model_requests=REQUESTS), KEY_GROUPS, KEY_GROUPS),
}


def _answer(shape: Shape) -> dict:
    require_owner()
    start_time = _integer("start_time", required=True)
    end_time = _integer("end_time")
    width_name = request.args.get("bucket_width") or DEFAULT_WIDTH
    if width_name not in WIDTHS:
        raise invalid("bucket_width", f"Invalid value for 'bucket_width': {width_name!r}. Supported values are: "
                                      "'1m', '1h' and '1d'.")
    width = WIDTHS[width_name]
    default_limit, most = LIMITS[width_name]
    limit = _integer("limit")
    limit = default_limit if limit is None else limit
    if not 1 <= limit <= most:
        raise invalid("limit", f"Invalid 'limit': {limit}. With bucket_width={width_name}, expected an integer "
                               f"between 1 and {most}.", "integer_out_of_range")
    if end_time is not None and end_time <= start_time:
        raise invalid("end_time", "'end_time' must be after 'start_time'.")
    group_by = _choices("group_by", shape.group_by)
    for name in UNRECORDED_FILTERS:
        if _values(name):
            raise unsupported_parameter(name, f"localq records usage per project, not per user or API key: "
                                              f"'{name}' cannot be honoured; filter on 'project_ids'.")
    batch = _boolean("batch") if shape.batch else None
    sources = frozenset(_choices("sources", IMAGE_SOURCES)) or None if shape.images else None
    sizes = frozenset(_choices("sizes", IMAGE_SIZES)) or None if shape.images else None
    only = Filter(shape.category, projects=frozenset(_values("project_ids")) or None,
                  models=_models(_values("models")), batch=batch, sizes=sizes, sources=sources)

    first = bucket_start(start_time, width)
    current_end = bucket_start(time.time(), width) + width  # no bucket that has not begun
    end = min(end_time, current_end) if end_time is not None else current_end
    page = request.args.get("page")
    cursor = _from_cursor(page, width_name, width, first, end) if page else first
    # a page's buckets only: the range from an old start_time to now may be millions of buckets
    stop = min(end, cursor + limit * width)
    shown = list(range(cursor, stop, width))
    following = stop if stop < end else None
    buckets = read_buckets(queue_runtime().redis, width, shown)
    data = [{"object": "bucket", "start_time": start, "end_time": start + width,
             "results": [shape.result(group) for group in aggregate(rows, only, group_by)]}
            for start, rows in zip(shown, buckets, strict=True)]
    return {"object": "page", "data": data, "has_more": following is not None,
            "next_page": _cursor(width_name, following) if following is not None else None}


def _handler(operation_id: str):
    shape = SHAPES[operation_id]

    def handle(call):
        return _answer(shape)

    handle.__name__ = operation_id.replace("-", "_")
    return handle


HANDLERS = {operation_id: _handler(operation_id) for operation_id in SHAPES}
