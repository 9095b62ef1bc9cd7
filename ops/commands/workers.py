"""`localq workers`: the live workers, from their heartbeats in Redis (store/heartbeats.py), with
their job slots and the batching engines of their text models (store/worker_slots.py)."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.settings import Settings
from ops.common import read_redis
from ops.gpus import format_size
from store.heartbeats import live_workers
from store.worker_slots import with_slots


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The live workers, as tables or, with --json, as a list (what `GET /v1/workers` answers)."""
    beats = [with_slots(beat) for beat in read_redis(settings.queue.redis_url, "workers", live_workers)]
    if args.json:
        print(json.dumps(beats, indent=2))
        return 0
    if not beats:
        Console(stderr=True).print("no live workers (none has sent a heartbeat lately)", highlight=False)
        return 0
    console = Console()
    console.print(workers_table(beats, time.time()))
    if any(beat["engines"] for beat in beats):
        console.print(engines_table(beats))
    return 0


def workers_table(beats: list[dict], now: float) -> Table:
    """One row per heartbeat document (as `with_slots` gives it)."""
    table = Table("id", "host", "device", "GPU / CUDA_VISIBLE_DEVICES", "queues", "memory used / budget",
                  "loaded models", "slots busy / total", "running jobs", "heartbeat", title="live workers")
    for beat in beats:
        device = str(beat.get("device") or "-") + (" (simulated)" if beat.get("simulated") else "")
        gpu = beat.get("gpu_index")
        cuda = beat.get("cuda_visible_devices")
        budget = beat.get("memory_budget_bytes")
        used = format_size(beat.get("memory_used_bytes") or 0)
        memory = f"{used} / {format_size(budget) if budget else 'no limit'}"
        age = now - float(beat.get("last_heartbeat") or now)
        cells = (
            str(beat.get("id", "?")), str(beat.get("hostname") or "-"), device,
            f"{'-' if gpu is None else gpu} / {'unset' if cuda is None else repr(cuda) if cuda == '' else cuda}",
            ", ".join(beat.get("queues") or ()) or "-", memory,
            ", ".join(beat.get("loaded_models") or ()) or "-", f"{beat['slots_busy']} / {beat['slots']}",
            "\n".join(job["id"] for job in beat["running_jobs"]) or "-", f"{max(age, 0):.0f} s ago",
        )
        table.add_row(*map(escape, cells))
    return table


def engines_table(beats: list[dict]) -> Table:
    """One row per batching engine: its sequences now, its speed and its prefix-cache hits."""
    table = Table("worker", "model", "running / parallel", "waiting", "tokens/s", "generated",
                  "cached / prompt tokens", title="batching engines")
    for beat in beats:
        for model, engine in sorted(beat["engines"].items()):
            prompt, cached = engine["prompt_tokens"], engine["cached_tokens"]
            share = f" ({100 * cached / prompt:.0f}%)" if prompt else ""
            cells = (
                str(beat.get("id", "?")), model, f"{engine['running']} / {engine['parallel']}",
                str(engine["waiting"]), f"{engine['tokens_per_second']:.1f}", str(engine["generated_tokens"]),
                f"{cached} / {prompt}{share}",
            )
            table.add_row(*map(escape, cells))
    return table
