"""Job metrics kept in Redis, so that every API process reports the same cluster-wide numbers.

Workers run on other machines than the API, so they cannot share prometheus_client's files.
Instead each finished job adds to a few Redis hashes, in one MULTI round trip after its terminal
event is published (`record_job`), and the API's `/metrics` reads them at scrape time
(`read_job_metrics`) and exposes them as Prometheus counters and histograms:

    localq:metrics:jobs          ["<kind>", "<outcome>"]            -> jobs finished
    localq:metrics:tokens        ["<kind>", "<model>"]              -> completion tokens generated
    localq:metrics:job_duration  ["<kind>", "<model>", "<le>"]      -> jobs whose duration fell in
                                 the bucket ending at <le> (only that bucket; the reader makes
                                 them cumulative), and ["<kind>", "<model>", "sum"] -> seconds
    localq:metrics:ttft          the same, for the time to first token
    localq:metrics:dead_letters  ["<reason>"]                       -> messages set aside in the
                                 dead letters (`store.dead_letters`), counted as they are kept

Fields are JSON arrays, so no label value can collide with a separator. The hashes never expire:
counters survive API restarts (Redis keeps them in its append-only file). MULTI makes a scrape
see a job's histogram bucket and sum together.

What is measured (all on the worker's own monotonic clock, never across machines):
- job duration: from the moment the worker took the job to its terminal event being published;
- time to first token: from the moment the worker took the job (so model loading counts, the
  time spent waiting in the queue does not) to the first delta that carries output: a chat or
  completion chunk with text (the opening `role: assistant` chunk does not count; a completion's
  echoed prompt does), or the first piece of a media job (image, audio, transcript);
- tokens generated: the result's `usage.completion_tokens` (chat and completions).

Outcomes are the job's final status: succeeded, failed, cancelled, expired.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

JOBS_KEY = "localq:metrics:jobs"
TOKENS_KEY = "localq:metrics:tokens"
DURATION_KEY = "localq:metrics:job_duration"
TTFT_KEY = "localq:metrics:ttft"
DEAD_LETTERS_KEY = "localq:metrics:dead_letters"

INF = float("inf")
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, INF)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, INF)
SUM = "sum"


def _field(*parts: str) -> str:
    return json.dumps(list(parts), separators=(",", ":"))


def _bound_text(bound: float) -> str:
    return "+Inf" if bound == INF else repr(float(bound))


def bucket_for(value: float, buckets: Iterable[float]) -> float:
    """The upper bound of the bucket `value` falls in (the smallest bound >= value)."""
    for bound in buckets:
        if value <= bound:
            return bound
    return INF


def record_job(client, *, kind: str, outcome: str, model: str | None = None, duration: float | None = None,
               ttft: float | None = None, completion_tokens: int | None = None) -> None:
    """Count one finished job, in one round trip. Durations and tokens need the model."""
    record_jobs(client, [{"kind": kind, "outcome": outcome, "model": model, "duration": duration, "ttft": ttft,
                          "completion_tokens": completion_tokens}])


def record_jobs(client, jobs: list[dict]) -> None:
    """`record_job` for several jobs (each a dict of its keyword arguments), in one round trip."""
    pipe = client.pipeline(transaction=True)
    queue_jobs(pipe, jobs)
    pipe.execute()


def queue_jobs(pipe, jobs: list[dict]) -> None:
    """Queue the counts of `record_jobs` on the caller's `pipe` (which may carry more: a job's
    usage, `store.usage.queue_usage`, goes in the same round trip)."""
    for job in jobs:
        _add(pipe, **job)


def _add(pipe, *, kind: str, outcome: str, model: str | None = None, duration: float | None = None,
         ttft: float | None = None, completion_tokens: int | None = None) -> None:
    pipe.hincrby(JOBS_KEY, _field(kind, outcome), 1)
    model = model or ""
    for key, value, buckets in ((DURATION_KEY, duration, DURATION_BUCKETS), (TTFT_KEY, ttft, TTFT_BUCKETS)):
        if value is None or not math.isfinite(value):
            continue
        value = max(0.0, value)
        pipe.hincrby(key, _field(kind, model, _bound_text(bucket_for(value, buckets))), 1)
        pipe.hincrbyfloat(key, _field(kind, model, SUM), value)
    if completion_tokens:
        pipe.hincrby(TOKENS_KEY, _field(kind, model), int(completion_tokens))


def count_dead_letter(pipe, reason: str) -> None:
    """Queue on `pipe` the count of one dead letter (`store.dead_letters.add` does, with the entry)."""
    pipe.hincrby(DEAD_LETTERS_KEY, _field(reason), 1)


def completion_tokens(result: Any) -> int | None:
    """`usage.completion_tokens` of a job's result, when it has one."""
    if isinstance(result, dict):
        usage = result.get("usage")
        if isinstance(usage, dict):
            tokens = usage.get("completion_tokens")
            if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
                return tokens
    return None


def carries_output(data: Any) -> bool:
    """Whether a delta event's data is output: not a chat chunk without text (the role chunk, a
    finish chunk, the usage chunk)."""
    if not isinstance(data, dict) or "choices" not in data:
        return True  # media pieces: images, audio, transcript text
    for choice in data.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls") or delta.get("refusal")):
            return True
    return False


class FirstToken:
    """Wraps a job's `emit` to note when the first delta carrying output goes out."""

    def __init__(self, emit: Callable[..., None], started: float, clock: Callable[[], float] = time.monotonic):
        self._emit = emit
        self._clock = clock
        self.started = started
        self.at: float | None = None

    def emit(self, type_: str, data: Any = None) -> None:
        if self.at is None and type_ == "delta" and carries_output(data):
            self.at = self._clock()
        self._emit(type_, data)

    @property
    def seconds(self) -> float | None:
        return None if self.at is None else self.at - self.started


# -- reading (the API, at scrape time) -------------------------------------------------------------


@dataclass
class Histogram:
    """One labelled histogram: cumulative counts per configured bound, and the sum."""

    buckets: list[tuple[float, int]]
    sum: float

    @property
    def count(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


@dataclass
class JobMetrics:
    jobs: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, outcome)
    tokens: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, model)
    duration: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (kind, model)
    ttft: dict[tuple[str, str], Histogram] = field(default_factory=dict)  # (kind, model)
    dead_letters: dict[str, int] = field(default_factory=dict)  # reason


READ_KEYS = (JOBS_KEY, TOKENS_KEY, DURATION_KEY, TTFT_KEY, DEAD_LETTERS_KEY)


def queue_reads(pipe) -> None:
    """Queue the reads `parse_job_metrics` expects (one HGETALL per hash) on `pipe`."""
    for key in READ_KEYS:
        pipe.hgetall(key)


def read_job_metrics(client) -> JobMetrics:
    pipe = client.pipeline(transaction=False)
    queue_reads(pipe)
    return parse_job_metrics(pipe.execute())


def parse_job_metrics(replies: list[dict]) -> JobMetrics:
    jobs, tokens, duration, ttft, *rest = replies  # rest: the dead letters (absent from older callers)
    return JobMetrics(
        jobs=_counters(jobs),
        tokens=_counters(tokens),
        duration=_histograms(duration, DURATION_BUCKETS),
        ttft=_histograms(ttft, TTFT_BUCKETS),
        dead_letters={labels[0]: count for labels, count in _counters(rest[0] if rest else {}, parts=1).items()},
    )


def _parts(raw_field) -> list[str] | None:
    try:
        parts = json.loads(_text(raw_field))
    except ValueError:
        return None
    return parts if isinstance(parts, list) and all(isinstance(p, str) for p in parts) else None


def _counters(raw: dict, parts: int = 2) -> dict[tuple[str, ...], int]:
    counters = {}
    for raw_field, value in raw.items():
        labels = _parts(raw_field)
        if labels is None or len(labels) != parts:
            continue
        counters[tuple(labels)] = int(_text(value))
    return counters


def _histograms(raw: dict, bounds: tuple[float, ...]) -> dict[tuple[str, str], Histogram]:
    per_bucket: dict[tuple[str, str], dict[float, int]] = {}
    sums: dict[tuple[str, str], float] = {}
    for raw_field, value in raw.items():
        parts = _parts(raw_field)
        if parts is None or len(parts) != 3:
            continue
        labels, last = (parts[0], parts[1]), parts[2]
        if last == SUM:
            sums[labels] = float(_text(value))
            continue
        try:
            bound = float(last)
        except ValueError:
            continue
        per_bucket.setdefault(labels, {})[bound] = int(_text(value))
    histograms = {}
    for labels, counts in per_bucket.items():
        # a bound no longer configured (the buckets changed) is folded into the next one up
        cumulative = [(bound, sum(n for le, n in counts.items() if le <= bound)) for bound in bounds]
        cumulative[-1] = (INF, sum(counts.values()))
        histograms[labels] = Histogram(cumulative, sums.get(labels, 0.0))
    return histograms


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
