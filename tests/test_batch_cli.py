"""`localq batch` end to end: the CLI as a subprocess -> openai SDK -> a real service (Redis, CPU worker, API),
the session's shared one (other modules' batches are listed too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CHAT_MODEL = "gpt-4o-mini"


@pytest.fixture(scope="module")
def service(stack):
    """The session's shared service (conftest's `stack`)."""
    return stack


@pytest.fixture(scope="module")
def localq(service):
    """Run `localq batch ARGS...` against the service; returns the CompletedProcess."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ops.cli", "batch", *args, "--base-url", service.base_url + "/v1"],
            cwd=cwd or REPO_ROOT, env={**env, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True, text=True, timeout=120,
        )

    return run


def chat_line(custom_id: str, content: str, **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": CHAT_MODEL, "messages": [{"role": "user", "content": content}], **extra}}


def write_jsonl(path: Path, items) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def test_submit_wait_list_and_status(localq, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"Say {i}.", max_tokens=4) for i in range(3)])
    out_dir = tmp_path / "out"
    done = localq("submit", str(source), "--endpoint", "/v1/chat/completions", "--wait",
                  "--output", str(out_dir), "--metadata", "suite=cli")
    assert done.returncode == 0, done.stdout + done.stderr
    batch_id = done.stdout.split()[0]
    assert batch_id.startswith("batch_")
    assert "completed" in done.stdout and "Traceback" not in done.stderr
    output = (out_dir / f"{batch_id}_output.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == ["q0", "q1", "q2"]
    assert not (out_dir / f"{batch_id}_error.jsonl").exists()

    listing = localq("list", "--limit", "10")
    assert listing.returncode == 0, listing.stderr
    assert batch_id in listing.stdout and "3/0/3" in listing.stdout

    status = localq("status", batch_id, "--json")
    assert status.returncode == 0, status.stderr
    batch = json.loads(status.stdout)
    assert batch["id"] == batch_id and batch["status"] == "completed"
    assert batch["request_counts"] == {"completed": 3, "failed": 0, "total": 3}
    assert batch["metadata"] == {"suite": "cli"}

    table = localq("status", batch_id)
    assert table.returncode == 0 and batch_id in table.stdout and "3/0/3" in table.stdout

    again = tmp_path / "again"
    downloaded = localq("download", batch_id, "--output", str(again))
    assert downloaded.returncode == 0, downloaded.stderr
    assert (again / f"{batch_id}_output.jsonl").read_text().splitlines() == output


def test_invalid_line_fails_with_its_line_number(localq, tmp_path):
    source = write_jsonl(tmp_path / "bad.jsonl", [chat_line("ok", "hi", max_tokens=2), '{"custom_id": "broken", '])
    done = localq("submit", str(source), "--endpoint", "/v1/chat/completions", "--wait", "--output", str(tmp_path))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "failed" in done.stdout
    assert "line 2" in done.stdout and "invalid_json_line" in done.stdout
    assert "Traceback" not in done.stderr


def test_api_errors_exit_2_with_the_api_message(localq):
    unknown = "batch_" + "0" * 32
    done = localq("cancel", unknown)
    assert done.returncode == 2
    assert f"No batch found with id '{unknown}'." in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_bad_metadata_is_refused(localq, tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [chat_line("a", "hi")])
    done = localq("submit", str(source), "--endpoint", "/v1/chat/completions", "--metadata", "novalue")
    assert done.returncode == 2 and "KEY=VALUE" in done.stderr
