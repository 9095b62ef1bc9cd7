"""Usage per project: what each finished job used, kept in Redis per minute, hour and day.

The worker that finishes a job (`tasks.run`) or a batch line (`tasks.batch_run`) reads what the
answer used from the answer itself (`usage_of`) and adds it to three time buckets in one MULTI
round trip (`record`), after the client has its answer; a failure to record is logged, never the
job's failure. The API's `/v1/organization/usage/*` operations (`api.routes.usage`) add the
buckets up (`read_buckets`, `aggregate`), and `/metrics` exposes the running totals as
Prometheus counters labelled by project (`read_totals`, `project_series`).

What counts (only jobs that succeeded; a failed or cancelled job used nothing a client was given):

    category              job kinds                   measures
    completions           chat, completion            input_tokens (usage.prompt_tokens),
                                                      input_cached_tokens (prompt_tokens_details
                                                      .cached_tokens), output_tokens
                                                      (usage.completion_tokens)
    embeddings            embedding                   input_tokens (usage.prompt_tokens)
    images                image, image_edit           images (pictures in `data`), with the
                                                      source (image.generation, image.edit) and
                                                      the size asked for
    audio_speeches        speech                      characters (of `input`)
    audio_transcriptions  transcription, translation  seconds of audio (rounded up per request,
                                                      as `usage.seconds` is)

and every one `requests` (OpenAI's `num_model_requests`): one per request, one per batch line.
Batch lines carry `batch` = "1". `moderations` has no kind: localq has no moderation models.

Redis layout (all integers; fields are JSON arrays, so no value can collide with a separator):

    localq:usage:m:<start>   one hash per minute bucket (<start>: Unix seconds, a multiple of 60)
    localq:usage:h:<start>   per hour (a multiple of 3600: hours and days are UTC)
    localq:usage:d:<start>   per day (UTC midnight)
        field ["<project>", "<category>", "<model>", "<batch 0|1>", "<size>", "<source>", "<measure>"]
    localq:usage:totals      since the first job, never expires (the Prometheus counters)
        field ["<project>", "<category>", "<model>", "<batch 0|1>", "<measure>"]

Each bucket expires its retention after its own end (EXPIREAT, so every writer agrees):
minutes 2 days, hours 35 days, days 400 days by default; the workers read LOCALQ_USAGE_MINUTE_TTL,
LOCALQ_USAGE_HOUR_TTL and LOCALQ_USAGE_DAY_TTL (seconds) once (`Retention.from_env`). A query for
1m buckets older than the minute retention finds them empty: ask for 1h or 1d buckets then.
The project of a server without keys is recorded as `default`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from store.rate_limits import OPEN_PROJECT

PREFIX = "localq:usage"
TOTALS_KEY = f"{PREFIX}:totals"

COMPLETIONS, EMBEDDINGS, IMAGES = "completions", "embeddings", "images"
AUDIO_SPEECHES, AUDIO_TRANSCRIPTIONS, MODERATIONS = "audio_speeches", "audio_transcriptions", "moderations"
CATEGORIES = (COMPLETIONS, EMBEDDINGS, IMAGES, AUDIO_SPEECHES, AUDIO_TRANSCRIPTIONS, MODERATIONS)
#: The category each job kind counts in; kinds not here (tokenize, detokenize) count nowhere.
KIND_CATEGORIES = {"chat": COMPLETIONS, "completion": COMPLETIONS, "response": COMPLETIONS, "embedding": EMBEDDINGS, "image": IMAGES,
                   "image_edit": IMAGES, "speech": AUDIO_SPEECHES, "transcription": AUDIO_TRANSCRIPTIONS,
                   "translation": AUDIO_TRANSCRIPTIONS}
IMAGE_SOURCES = {"image": "image.generation", "image_edit": "image.edit"}

INPUT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS = "input_tokens", "input_cached_tokens", "output_tokens"
REQUESTS, PICTURES, SECONDS, CHARACTERS = "requests", "images", "seconds", "characters"
MEASURES = (INPUT_TOKENS, CACHED_TOKENS, OUTPUT_TOKENS, REQUESTS, PICTURES, SECONDS, CHARACTERS)

#: Bucket widths the API offers, in seconds, and the letter of their keys.
WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
_LETTERS = {60: "m", 3600: "h", 86400: "d"}
DAY = 86400
_SIZE = re.compile(r"^\d+x\d+$")


#: The variables that set how long each width of bucket is kept (seconds after its end).
RETENTION_ENV = {"minute": "LOCALQ_USAGE_MINUTE_TTL", "hour": "LOCALQ_USAGE_HOUR_TTL", "day": "LOCALQ_USAGE_DAY_TTL"}


@dataclass(frozen=True)
class Retention:
    """Seconds each bucket is kept after its end, per width."""

    minute: float = 2 * DAY
    hour: float = 35 * DAY
    day: float = 400 * DAY

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Retention:
        """The retention the environment sets (LOCALQ_USAGE_*_TTL, seconds; blank: the default); a
        malformed value raises ValueError naming its variable."""
        return cls(**{width: _seconds(environ, name, getattr(cls, width)) for width, name in RETENTION_ENV.items()})

    def of(self, width: int) -> float:
        return {60: self.minute, 3600: self.hour, DAY: self.day}[width]


@functools.cache
def configured_retention() -> Retention:
    """This process's `Retention.from_env()`, read once."""
    return Retention.from_env()


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


@dataclass(frozen=True)
class Usage:
    """What one request (or batch line) used."""

    project: str
    category: str
    model: str
    measures: Mapping[str, int]
    batch: bool = False
    size: str = ""
    source: str = ""

    def labels(self) -> tuple[str, str, str, str, str, str]:
        return (self.project or OPEN_PROJECT, self.category, self.model, "1" if self.batch else "0", self.size,
                self.source)


def _count(value: Any) -> int:
    """A non-negative integer from a usage field; 0 for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return 0
    return max(0, int(value))


def transcribed_seconds(result: Any) -> int | None:
    """The seconds of audio a transcription's answer says it read: `usage.seconds` (json,
    verbose_json), else verbose_json's `duration` rounded up the same way; None when the answer
    does not say (text, srt and vtt answers, translations)."""
    if not isinstance(result, dict):
        return None
    usage = result.get("usage")
    if isinstance(usage, dict) and usage.get("type") == "duration" and usage.get("seconds") is not None:
        return _count(usage["seconds"])
    duration = result.get("duration")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and math.isfinite(duration):
        return max(0, math.ceil(duration))
    return None


def usage_of(*, project: str, kind: str, model: str, request: Mapping | None, result: Any, batch: bool = False,
             audio_seconds: float | None = None) -> Usage | None:
    """What a successful job's `result` (the answer its client got) used; None for a kind that
    counts nowhere. `audio_seconds`: the length of a transcription's audio, for answers that do
    not carry it (see `transcribed_seconds`)."""
    category = KIND_CATEGORIES.get(kind)
    if category is None:
        return None
    request = request or {}
    usage = result.get("usage") if isinstance(result, dict) else None
    usage = usage if isinstance(usage, dict) else {}
    measures = {REQUESTS: 1}
    size = source = ""
    if category == COMPLETIONS and "input_tokens" in usage:  # a Response's usage (the Responses API)
        details = usage.get("input_tokens_details")
        measures[INPUT_TOKENS] = _count(usage.get("input_tokens"))
        measures[CACHED_TOKENS] = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        measures[OUTPUT_TOKENS] = _count(usage.get("output_tokens"))
    elif category == COMPLETIONS:
        details = usage.get("prompt_tokens_details")
        measures[INPUT_TOKENS] = _count(usage.get("prompt_tokens"))
        measures[CACHED_TOKENS] = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        measures[OUTPUT_TOKENS] = _count(usage.get("completion_tokens"))
    elif category == EMBEDDINGS:
        measures[INPUT_TOKENS] = _count(usage.get("prompt_tokens"))
    elif category == IMAGES:
        data = result.get("data") if isinstance(result, dict) else None
        measures[PICTURES] = len(data) if isinstance(data, list) else 0
        source = IMAGE_SOURCES.get(kind, "")
        for candidate in (request.get("size"), result.get("size") if isinstance(result, dict) else None):
            if isinstance(candidate, str) and _SIZE.match(candidate):
                size = candidate
                break
    elif category == AUDIO_SPEECHES:
        text = request.get("input")
        measures[CHARACTERS] = len(text) if isinstance(text, str) else 0
    elif category == AUDIO_TRANSCRIPTIONS:
        seconds = transcribed_seconds(result)
        if seconds is None and audio_seconds is not None and math.isfinite(audio_seconds):
            seconds = max(0, math.ceil(audio_seconds))
        measures[SECONDS] = seconds or 0
    return Usage(project=project, category=category, model=model, measures=measures, batch=batch, size=size,
                 source=source)


# -- writing (the workers) -------------------------------------------------------------------------


def _field(*parts: str) -> str:
    return json.dumps(list(parts), separators=(",", ":"))


def bucket_start(at: float, width: int) -> int:
    """The start of the bucket of `width` seconds that time `at` falls in (UTC-aligned)."""
    return int(at) // width * width


def bucket_key(width: int, start: int) -> str:
    return f"{PREFIX}:{_LETTERS[width]}:{start}"


def queue_usage(pipe, entries: Iterable[Usage], at: float, retention: Retention = Retention()) -> None:
    """Queue on `pipe` the additions of `entries`, used at time `at` (Unix seconds), to their
    minute, hour and day buckets and to the totals."""
    entries = [entry for entry in entries if entry is not None]
    if not entries:
        return
    for width in _LETTERS:
        start = bucket_start(at, width)
        key = bucket_key(width, start)
        for entry in entries:
            for measure, value in entry.measures.items():
                if value:
                    pipe.hincrby(key, _field(*entry.labels(), measure), int(value))
        pipe.expireat(key, start + width + int(retention.of(width)))
    for entry in entries:
        project, category, model, batch, _, _ = entry.labels()
        for measure, value in entry.measures.items():
            if value:
                pipe.hincrby(TOTALS_KEY, _field(project, category, model, batch, measure), int(value))


def record(client, entries: Iterable[Usage], at: float, retention: Retention = Retention()) -> None:
    """`queue_usage` in a MULTI of its own (one round trip)."""
    pipe = client.pipeline(transaction=True)
    queue_usage(pipe, entries, at, retention)
    if len(pipe):
        pipe.execute()


# -- reading (the API) -----------------------------------------------------------------------------


Labels = tuple[str, str, str, str, str, str]  # project, category, model, batch, size, source


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parts(raw_field, length: int) -> list[str] | None:
    try:
        parts = json.loads(_text(raw_field))
    except ValueError:
        return None
    if not isinstance(parts, list) or len(parts) != length or not all(isinstance(p, str) for p in parts):
        return None
    return parts


def parse_bucket(raw: Mapping) -> dict[Labels, dict[str, int]]:
    """One bucket hash as {labels: {measure: value}}."""
    rows: dict[Labels, dict[str, int]] = {}
    for raw_field, value in (raw or {}).items():
        parts = _parts(raw_field, 7)
        if parts is None:
            continue
        try:
            number = int(_text(value))
        except ValueError:
            continue
        rows.setdefault(tuple(parts[:6]), {})[parts[6]] = number
    return rows


def read_buckets(client, width: int, starts: list[int]) -> list[dict[Labels, dict[str, int]]]:
    """The buckets of `width` seconds starting at `starts`, in one round trip."""
    if not starts:
        return []
    pipe = client.pipeline(transaction=False)
    for start in starts:
        pipe.hgetall(bucket_key(width, start))
    return [parse_bucket(raw) for raw in pipe.execute()]


#: What `group_by` may name, and where each value comes from in a bucket's labels.
GROUPS = ("project_id", "model", "batch", "size", "source")


@dataclass(frozen=True)
class Filter:
    """Which rows of one category count; None: no filter on that dimension."""

    category: str
    projects: frozenset[str] | None = None
    models: frozenset[str] | None = None
    batch: bool | None = None
    sizes: frozenset[str] | None = None
    sources: frozenset[str] | None = None

    def admits(self, labels: Labels) -> bool:
        project, category, model, batch, size, source = labels
        return (category == self.category
                and (self.projects is None or project in self.projects)
                and (self.models is None or model in self.models)
                and (self.batch is None or (batch == "1") == self.batch)
                and (self.sizes is None or size in self.sizes)
                and (self.sources is None or source in self.sources))


def group_value(name: str, labels: Labels) -> str | bool | None:
    project, _, model, batch, size, source = labels
    return {"project_id": project, "model": model, "batch": batch == "1", "size": size or None,
            "source": source or None}[name]


@dataclass
class Group:
    """The sum of one group's rows in one bucket."""

    key: dict[str, Any]
    measures: dict[str, int] = field(default_factory=dict)


def aggregate(rows: Mapping[Labels, Mapping[str, int]], only: Filter, group_by: Iterable[str] = ()) -> list[Group]:
    """The rows `only` admits, summed per value of the `group_by` dimensions (all together when
    there are none), in a stable order; an empty list when nothing was used."""
    group_by = [name for name in GROUPS if name in set(group_by)]
    groups: dict[tuple, Group] = {}
    for labels, measures in rows.items():
        if not only.admits(labels):
            continue
        key = {name: group_value(name, labels) for name in group_by}
        group = groups.setdefault(tuple(key.values()), Group(key))
        for measure, value in measures.items():
            group.measures[measure] = group.measures.get(measure, 0) + value
    ordered = sorted(groups.items(), key=lambda item: [(v is None, str(v)) for v in item[0]])
    return [group for _, group in ordered]


# -- Prometheus (the API, at scrape time) ----------------------------------------------------------

#: At most this many projects get a label of their own; the rest are added up as `other`.
MAX_PROJECT_LABELS = 50
OTHER = "other"

Totals = dict[tuple[str, str, str, str, str], int]  # (project, category, model, batch, measure) -> value


def parse_totals(raw: Mapping) -> Totals:
    totals: Totals = {}
    for raw_field, value in (raw or {}).items():
        parts = _parts(raw_field, 5)
        if parts is None:
            continue
        try:
            totals[tuple(parts)] = int(_text(value))
        except ValueError:
            continue
    return totals


def read_totals(client) -> Totals:
    return parse_totals(client.hgetall(TOTALS_KEY))


@dataclass
class ProjectSeries:
    """The counters `/metrics` exposes per project, with at most `MAX_PROJECT_LABELS` projects."""

    tokens: dict[tuple[str, str, str], int] = field(default_factory=dict)  # (project, model, direction)
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (project, category)
    batch_lines: dict[tuple[str, str], int] = field(default_factory=dict)  # (project, category)
    images: dict[tuple[str, str], int] = field(default_factory=dict)  # (project, model)
    audio_seconds: dict[tuple[str, str], int] = field(default_factory=dict)  # (project, model)
    audio_characters: dict[tuple[str, str], int] = field(default_factory=dict)  # (project, model)


def kept_projects(totals: Totals, limit: int = MAX_PROJECT_LABELS) -> set[str]:
    """The `limit` projects that used the most: most requests, then most tokens, then by id."""
    requests: dict[str, int] = {}
    tokens: dict[str, int] = {}
    for (project, _, _, _, measure), value in totals.items():
        requests.setdefault(project, 0)
        tokens.setdefault(project, 0)
        if measure == REQUESTS:
            requests[project] += value
        elif measure in (INPUT_TOKENS, OUTPUT_TOKENS):
            tokens[project] += value
    ranked = sorted(requests, key=lambda p: (-requests[p], -tokens[p], p))
    return set(ranked[:limit])


def project_series(totals: Totals, limit: int = MAX_PROJECT_LABELS) -> ProjectSeries:
    kept = kept_projects(totals, limit)
    series = ProjectSeries()

    def add(table: dict, key: tuple, value: int) -> None:
        table[key] = table.get(key, 0) + value

    for (project, category, model, batch, measure), value in totals.items():
        project = project if project in kept else OTHER
        if measure == INPUT_TOKENS:
            add(series.tokens, (project, model, "input"), value)
        elif measure == OUTPUT_TOKENS:
            add(series.tokens, (project, model, "output"), value)
        elif measure == REQUESTS:
            add(series.requests, (project, category), value)
            if batch == "1":
                add(series.batch_lines, (project, category), value)
        elif measure == PICTURES:
            add(series.images, (project, model), value)
        elif measure == SECONDS:
            add(series.audio_seconds, (project, model), value)
        elif measure == CHARACTERS:
            add(series.audio_characters, (project, model), value)
    return series
