"""`localq dead-letters`: the job messages the workers set aside (store/dead_letters.py), newest first."""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.settings import Settings
from ops.common import read_redis
from store.dead_letters import read as read_dead_letters


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The newest dead letters, as a table or, with --json, as a list."""
    entries = read_redis(settings.queue.redis_url, "dead letters", lambda client: read_dead_letters(client, args.limit))
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        Console(stderr=True).print("no dead letters", highlight=False)
        return 0
    table = Table("when (UTC)", "reason", "task", "queue", "job", "error", title="dead letters, newest first")
    for entry in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(entry.get("at") or 0)))
        cells = (when, entry.get("reason", ""), entry.get("task", ""), entry.get("queue", ""),
                 entry.get("job_id", ""), entry.get("error", "")[:200])
        table.add_row(*map(escape, cells))
    Console().print(table)
    return 0
