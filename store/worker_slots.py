"""A worker heartbeat's slots, running jobs and batching engines, in one shape for every reader.

Workers that run several jobs at once (issue 12) add `slots`, `slots_busy`, `running_jobs` and
`engines` to their heartbeat (see `store.heartbeats`). `GET /v1/workers`, `localq workers` and
`/metrics` read heartbeats through `with_slots`, so a heartbeat from an older worker (one job at a
time, no engines) shows as one slot, busy while it has a `current_job`, and a field of the wrong
type never reaches a client as something its schema does not allow.
"""

from __future__ import annotations

import math
from typing import Any

ENGINE_COUNTS = ("parallel", "running", "waiting", "steps", "prompt_tokens", "cached_tokens", "generated_tokens")


def with_slots(beat: dict) -> dict:
    """`beat` with `slots`, `slots_busy`, `running_jobs` and `engines` present and well-typed."""
    running = beat.get("running_jobs")
    if isinstance(running, list):
        running = [_job(job) for job in running if isinstance(job, dict) and isinstance(job.get("id"), str)]
    elif isinstance(beat.get("current_job"), str):
        running = [{"id": beat["current_job"], "model": _text_or_none(beat.get("current_job_model"))}]
    else:
        running = []
    busy = _count(beat.get("slots_busy"), len(running))
    slots = max(_count(beat.get("slots"), 1), 1)
    engines = beat.get("engines")
    engines = {name: _engine(stats) for name, stats in engines.items()
               if isinstance(name, str) and isinstance(stats, dict)} if isinstance(engines, dict) else {}
    return {**beat, "slots": slots, "slots_busy": busy, "running_jobs": running, "engines": engines}


def _job(job: dict) -> dict:
    return {"id": job["id"], "model": _text_or_none(job.get("model"))}


def _engine(stats: dict) -> dict:
    rate = stats.get("tokens_per_second")
    rate = float(rate) if _is_number(rate) and math.isfinite(rate) and rate > 0 else 0.0
    return {**{key: _count(stats.get(key), 0) for key in ENGINE_COUNTS}, "tokens_per_second": rate}


def _count(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
