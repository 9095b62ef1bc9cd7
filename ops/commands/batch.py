"""`localq batch`: submit, watch, list, inspect, cancel and download batches with the `openai` SDK.

Talks to any OpenAI-compatible server (a localq API by default) at `--base-url`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from openai import OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8080/v1"
FINAL_STATUSES = ("completed", "failed", "expired", "cancelled")
POLL_INTERVAL = 0.5
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


def add_parser(commands) -> None:
    """Register `batch` and its actions on the `localq` subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--base-url", default=None,
        help=f"API base URL (default: LOCALQ_BASE_URL or {DEFAULT_BASE_URL})",
    )
    common.add_argument("--api-key", default=None, help="API key (default: OPENAI_API_KEY or 'unused')")

    batch = commands.add_parser("batch", help="submit, watch, list, cancel and download batches")
    actions = batch.add_subparsers(required=True, metavar="ACTION")

    submit = actions.add_parser("submit", parents=[common], help="upload a JSONL file and create a batch")
    submit.add_argument("file", type=Path, metavar="FILE", help="JSONL input, one request per line")
    submit.add_argument("--endpoint", required=True, choices=ENDPOINTS, help="the endpoint every line calls")
    submit.add_argument("--wait", action="store_true", help="show progress until the batch is final, then download")
    submit.add_argument("--output", type=Path, default=Path("."), help="folder for downloaded files (default .)")
    submit.add_argument("--metadata", nargs="+", default=[], metavar="KEY=VALUE", help="batch metadata")
    submit.set_defaults(command=run, action=_submit)

    listing = actions.add_parser("list", parents=[common], help="list recent batches")
    listing.add_argument("--limit", type=int, default=20, help="how many (default 20)")
    listing.set_defaults(command=run, action=_list)

    status = actions.add_parser("status", parents=[common], help="show one batch")
    status.add_argument("batch_id", metavar="ID")
    status.add_argument("--json", action="store_true", help="print the batch object as JSON")
    status.set_defaults(command=run, action=_status)

    cancel = actions.add_parser("cancel", parents=[common], help="cancel a batch")
    cancel.add_argument("batch_id", metavar="ID")
    cancel.set_defaults(command=run, action=_cancel)

    download = actions.add_parser("download", parents=[common], help="download a batch's output and error files")
    download.add_argument("batch_id", metavar="ID")
    download.add_argument("--output", type=Path, default=Path("."), help="folder for the files (default .)")
    download.set_defaults(command=run, action=_download)


def run(args: argparse.Namespace, settings=None) -> int:
    """Run one `localq batch` action; API errors are reported (exit 2), never raised."""
    import openai  # here, not at the top: other `localq` commands need not pay for importing it
    from openai import OpenAI

    out, err = Console(), Console(stderr=True)
    client = OpenAI(
        base_url=args.base_url or os.environ.get("LOCALQ_BASE_URL") or DEFAULT_BASE_URL,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or "unused",
        max_retries=1,
    )
    try:
        return args.action(client, args, out, err)
    except openai.APIStatusError as exc:
        err.print(f"[bold red]error:[/] {escape(_api_message(exc))}", highlight=False, soft_wrap=True)
        return 2
    except openai.APIConnectionError as exc:
        err.print(f"[bold red]error:[/] cannot reach {escape(str(client.base_url))}: {escape(str(exc))}",
                  highlight=False, soft_wrap=True)
        return 2
    except OSError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return 2


def _api_message(exc) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return f"{error['message']} (HTTP {exc.status_code})"
    return exc.message


# --- actions --------------------------------------------------------------------------------


def _submit(client: OpenAI, args, out: Console, err: Console) -> int:
    metadata = _metadata(args.metadata)
    with args.file.open("rb") as handle:
        uploaded = client.files.create(file=(args.file.name, handle), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint=args.endpoint, completion_window="24h",
        **({"metadata": metadata} if metadata else {}),
    )
    out.print(batch.id, highlight=False)
    if not args.wait:
        return 0
    batch = _watch(client, batch, err)
    _summary(batch, out)
    if batch.errors and batch.errors.data:
        for error in batch.errors.data:
            line = f"line {error.line}" if error.line is not None else "-"
            out.print(f"  {line}: [bold]{escape(error.code or '')}[/] {escape(error.message or '')}", highlight=False)
    _save_files(client, batch, args.output, out)
    return 0 if batch.status == "completed" else 1


def _list(client: OpenAI, args, out: Console, err: Console) -> int:
    page = client.batches.list(limit=args.limit)
    table = Table("id", "status", "endpoint", "completed/failed/total", "created", title="batches")
    for batch in page.data:
        table.add_row(batch.id, _styled_status(batch.status), batch.endpoint, _counts(batch), _when(batch.created_at))
    out.print(table)
    return 0


def _status(client: OpenAI, args, out: Console, err: Console) -> int:
    batch = client.batches.retrieve(args.batch_id)
    if args.json:
        print(batch.model_dump_json(indent=2))
        return 0
    table = Table("field", "value", title=f"batch {batch.id}")
    table.add_row("status", _styled_status(batch.status))
    table.add_row("endpoint", batch.endpoint)
    table.add_row("completed/failed/total", _counts(batch))
    table.add_row("input_file_id", batch.input_file_id or "-")
    table.add_row("output_file_id", batch.output_file_id or "-")
    table.add_row("error_file_id", batch.error_file_id or "-")
    for field in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at",
                  "cancelling_at", "cancelled_at", "expired_at", "expires_at"):
        value = getattr(batch, field, None)
        if value:
            table.add_row(field, _when(value))
    if batch.metadata:
        table.add_row("metadata", escape(json.dumps(batch.metadata)))
    if batch.errors and batch.errors.data:
        for error in batch.errors.data:
            table.add_row(f"error line {error.line}", escape(f"{error.code}: {error.message}"))
    out.print(table)
    return 0


def _cancel(client: OpenAI, args, out: Console, err: Console) -> int:
    batch = client.batches.cancel(args.batch_id)
    out.print(f"{batch.id} {batch.status}", highlight=False)
    return 0


def _download(client: OpenAI, args, out: Console, err: Console) -> int:
    batch = client.batches.retrieve(args.batch_id)
    if not (batch.output_file_id or batch.error_file_id):
        err.print(f"batch {batch.id} ({batch.status}) has no output or error file yet", highlight=False)
        return 1
    _save_files(client, batch, args.output, out)
    return 0


# --- progress -------------------------------------------------------------------------------


class CountsColumn(ProgressColumn):
    """`done/total (N failed)` from the task's fields."""

    def render(self, task: Task) -> Text:
        failed = task.fields.get("failed", 0)
        text = Text(f"{int(task.completed)}/{int(task.total or 0)}")
        if failed:
            text.append(f" ({failed} failed)", style="red")
        return text


class RateColumn(ProgressColumn):
    """Lines per second over the watch so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0
        if not elapsed or not task.completed:
            return Text("- lines/s", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:.1f} lines/s", style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """Time left at the average rate so far."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0
        if not task.total or not task.completed or not elapsed:
            return Text("ETA -", style="progress.remaining")
        left = (task.total - task.completed) * elapsed / task.completed
        return Text(f"ETA {int(left) // 60}:{int(left) % 60:02d}", style="progress.remaining")


def _watch(client: OpenAI, batch, err: Console):
    """Poll until the batch is final, showing a live progress bar on stderr."""
    progress = Progress(
        TextColumn("[bold]{task.fields[status]}"), BarColumn(), CountsColumn(), RateColumn(), EtaColumn(),
        TimeElapsedColumn(), console=err, transient=False,
    )
    with progress:
        task = progress.add_task(batch.id, total=None, status=batch.status, failed=0)
        while True:
            counts = batch.request_counts
            total = counts.total if counts and counts.total else None
            done = (counts.completed + counts.failed) if counts else 0
            progress.update(task, total=total, completed=done, status=batch.status,
                            failed=counts.failed if counts else 0)
            if batch.status in FINAL_STATUSES:
                return batch
            time.sleep(POLL_INTERVAL)
            batch = client.batches.retrieve(batch.id)


# --- helpers --------------------------------------------------------------------------------


def _metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata expects KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


def _save_files(client: OpenAI, batch, folder: Path, out: Console) -> None:
    for suffix, file_id in (("output", batch.output_file_id), ("error", batch.error_file_id)):
        if not file_id:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{batch.id}_{suffix}.jsonl"
        path.write_bytes(client.files.content(file_id).content)
        out.print(f"{suffix}: {escape(str(path))}", highlight=False)


def _summary(batch, out: Console) -> None:
    counts = batch.request_counts
    line = f"batch {batch.id} {_styled_status(batch.status)}"
    if counts:
        line += f": {counts.completed} completed, {counts.failed} failed, {counts.total} total"
    out.print(line, highlight=False)


def _counts(batch) -> str:
    counts = batch.request_counts
    return f"{counts.completed}/{counts.failed}/{counts.total}" if counts else "-"


def _styled_status(status: str) -> str:
    style = {"completed": "green", "failed": "red", "expired": "red", "cancelled": "yellow"}.get(status)
    return f"[{style}]{status}[/]" if style else status


def _when(timestamp: int | None) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S") if timestamp else "-"
