"""Benchmark: a fair share of the queue between projects (`store.admission`).

Starts an embedded Redis, one CPU worker and the API, serving the embeddings model alone (so no
other model loads while it measures), and makes keys for two projects. Each of `--rounds` rounds
times project B's `--small`-line embeddings batch alone (median of `--alone` runs, from create to
`completed`); then project A submits a `--large`-line embeddings batch, and one second later B
submits its batch again. Target: B completes within 2x its time alone (the median round), while
A's batch completes with every line exactly once (every round). Prints JSON.

`--admit N` fixes the chunks admitted per queue (LOCALQ_BATCH_ADMIT); a very large N sends every
chunk at once, as localq did before the fair share, for comparison.

    .venv/bin/python -m ops.bench.fairness [--large 2000] [--small 100] [--alone 3] [--rounds 3] [--admit N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from ops.redis_server import RedisServer
from ops.stack import REPO, ServiceProcesses, wait_until
from store.api_keys import KeyStore

MODEL = "all-minilm-l6-v2"
FINAL = ("completed", "failed", "expired", "cancelled")


def batch_file(project: str, lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{project}-{i}", "method": "POST", "url": "/v1/embeddings",
                                "body": {"model": MODEL, "input": f"{project} says sentence number {i} of the batch"}}
                               ).encode() + b"\n" for i in range(lines))


def submit(client: httpx.Client, project: str, lines: int) -> tuple[str, float]:
    """(batch id, when it was created)."""
    source = client.post("/files", files={"file": (f"{project}.jsonl", batch_file(project, lines))},
                         data={"purpose": "batch"}).json()
    created = time.monotonic()
    batch = client.post("/batches", json={"input_file_id": source["id"], "endpoint": "/v1/embeddings",
                                          "completion_window": "24h"}).json()
    return batch["id"], created


def finished(client: httpx.Client, batch_id: str, timeout: float = 1800) -> tuple[dict, float]:
    """(the final batch, when it was seen final), polling every 50 ms."""
    batch = wait_until(lambda: (found := client.get(f"/batches/{batch_id}").json())["status"] in FINAL and found,
                       timeout, f"batch {batch_id}", interval=0.05)
    return batch, time.monotonic()


def run_alone(client: httpx.Client, lines: int) -> float:
    batch_id, created = submit(client, "b", lines)
    batch, done = finished(client, batch_id)
    assert batch["status"] == "completed", batch
    return done - created


def exactly_once(client: httpx.Client, batch: dict, project: str, lines: int) -> bool:
    output = client.get(f"/files/{batch['output_file_id']}/content").text.splitlines()
    ids = [json.loads(line)["custom_id"] for line in output]
    return len(ids) == lines and set(ids) == {f"{project}-{i}" for i in range(lines)}


def measure(a: httpx.Client, b: httpx.Client, large: int, small: int, alone_runs: int) -> dict:
    alone = statistics.median(run_alone(b, small) for _ in range(alone_runs))
    large_id, large_created = submit(a, "a", large)
    time.sleep(1.0)
    small_id, small_created = submit(b, "b", small)
    small_batch, small_done = finished(b, small_id)
    large_batch, large_done = finished(a, large_id)
    shared = small_done - small_created
    once = large_batch["status"] == "completed" and exactly_once(a, large_batch, "a", large)
    return {
        "small_alone_s": round(alone, 3), "small_beside_large_s": round(shared, 3),
        "ratio": round(shared / alone, 2), "large_s": round(large_done - large_created, 1),
        "large_lines_per_s": round(large / (large_done - large_created), 1),
        "small_finished_before_large": small_done < large_done,
        "large_every_line_once": once, "small_status": small_batch["status"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--large", type=int, default=2000)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--alone", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--admit", type=int, default=None, help="LOCALQ_BATCH_ADMIT for the worker")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        models = Path(tmp) / "models"
        models.mkdir()
        shutil.copy(REPO / "models" / f"{MODEL}.yaml", models)
        env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_FILES_DIR": str(Path(tmp) / "files"),
               "LOCALQ_MODELS_DIR": str(models)}
        if args.admit:
            env["LOCALQ_BATCH_ADMIT"] = str(args.admit)
        with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
            keystore = KeyStore(client)
            keys = {"a": keystore.create("project-a")[0], "b": keystore.create("project-b")[0]}
        stack = ServiceProcesses(env=env, log_dir=Path(tmp) / "logs")
        try:
            stack.start_worker()
            stack.start_api()
            a, b = (httpx.Client(base_url=stack.base_url + "/v1", headers={"Authorization": f"Bearer {keys[name]}"},
                                 timeout=120) for name in ("a", "b"))
            run_alone(b, 8)  # load the model, warm the path
            rounds = [measure(a, b, args.large, args.small, args.alone) for _ in range(args.rounds)]
            ratio = statistics.median(r["ratio"] for r in rounds)
            once = all(r["large_every_line_once"] for r in rounds)
            print(json.dumps({"large": args.large, "small": args.small, "admit": args.admit or "auto",
                              "rounds": rounds, "median_ratio": ratio, "large_every_line_once": once,
                              "target_met": ratio <= 2 and once}, indent=2))
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
