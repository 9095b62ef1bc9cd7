"""Large job results kept in the file store's folder, with a small reference in Redis.

A job's result lives in its record for `LOCALQ_JOB_TTL` (24 h) and in its `result` event for the
resume window. A picture's base64, speech, a long transcript weigh hundreds of KB, and in Redis every
byte is memory (and append-only file). A result whose JSON text is longer than `threshold` is
written to `<folder>/<job id>.json` (`LOCALQ_FILES_DIR/results`, shared by the processes like batch
output files) and Redis keeps `{"$file": "<job id>.json"}` in its place, in the record and the
event alike; `JobStore` and `EventLog` put the text back when they read it, so every reader sees
the result as it was. The batch sweep deletes files older than the job TTL (`purge_older`).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

THRESHOLD = 64 * 1024  # bytes of JSON text above which a result goes to a file
RESULTS_FOLDER = "results"
_REFERENCE = re.compile(r'\{"\$file":"([A-Za-z0-9_.-]{1,128}\.json)"\}')


class Spill:
    def __init__(self, folder: Path, threshold: int = THRESHOLD):
        self.folder = Path(folder)
        self.threshold = threshold

    @classmethod
    def under(cls, files_dir: Path, threshold: int = THRESHOLD) -> Spill:
        return cls(Path(files_dir) / RESULTS_FOLDER, threshold)

    def out(self, job_id: str, text: str) -> str:
        """`text` as it is, or, past the threshold, written to the job's file and a reference to it."""
        if len(text) <= self.threshold or not re.fullmatch(r"[A-Za-z0-9_-]{1,120}", job_id):
            return text
        name = f"{job_id}.json"
        target = self.folder / name
        if not target.exists():  # the record and the event carry the same result: one file
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = self.folder / f".{name}.part"
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, target)  # whole or absent
        return json.dumps({"$file": name}, separators=(",", ":"))

    def back(self, text: str | None) -> str | None:
        """The text a reference stands for (None if its file is gone); any other text as it is."""
        if text is None or not text.startswith('{"$file":'):
            return text
        match = _REFERENCE.fullmatch(text)
        if match is None:
            return text
        try:
            return (self.folder / match[1]).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None


def purge_older(folder: Path, seconds: float, now: float | None = None, limit: int = 10_000) -> int:
    """Delete the files in `folder` last written more than `seconds` ago (at most `limit`); how many."""
    cutoff = (now if now is not None else time.time()) - seconds
    removed = 0
    try:
        entries = os.scandir(folder)
    except FileNotFoundError:
        return 0
    with entries:
        for entry in entries:
            if removed >= limit:
                break
            try:
                if entry.is_file(follow_symlinks=False) and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed
