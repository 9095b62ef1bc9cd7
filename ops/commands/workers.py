"""`localq workers`: the live workers, from their heartbeats in Redis (store/heartbeats.py)."""

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


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The live workers, as a table or, with --json, as a list."""
    beats = read_redis(settings.queue.redis_url, "workers", live_workers)
    if args.json:
        print(json.dumps(beats, indent=2))
        return 0
    if not beats:
        Console(stderr=True).print("no live workers (none has sent a heartbeat lately)", highlight=False)
        return 0
    Console().print(workers_table(beats, time.time()))
    return 0


def workers_table(beats: list[dict], now: float) -> Table:
    """One row per heartbeat document (see store.heartbeats)."""
    table = Table("id", "host", "device", "GPU / CUDA_VISIBLE_DEVICES", "queues", "memory used / budget",
                  "loaded models", "current job", "heartbeat", title="live workers")
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
            ", ".join(beat.get("loaded_models") or ()) or "-", str(beat.get("current_job") or "-"),
            f"{max(age, 0):.0f} s ago",
        )
        table.add_row(*map(escape, cells))
    return table
