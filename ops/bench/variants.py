"""Benchmark: localq stacks that differ only in their environment, side by side, with llama-server.

Each variant is a whole localq (its own embedded Redis, the API, one worker whose model has
`--parallel` slots, `--threads` threads, preloaded) started with the variant's extra environment
variables (a worker setting, `GOMP_SPINCOUNT`, ...). llama.cpp's `llama-server` (from the
`xllamacpp` wheel, 4 slots) and in-process llama-cpp-python run beside them. Round by round, in
an order that rotates, every system serves `--singles` single streams (time to first token,
decode rate) and then `--streams` concurrent streams (aggregate tokens/s). A comparison across
separate runs on a shared machine mixes the change with the machine's mood; here the variants
share one run, so their ratios compare like with like.

    .venv/bin/python -m ops.bench.variants --variant brief GOMP_SPINCOUNT=10000 --variant chosen \\
        [--rounds 6] [--singles 2] [--peer-python /tmp/peers/bin/python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from ops.bench.concurrency import (MODEL, PEER_MODEL, HttpStreams, Local, concurrent_figures, find_peer_python,
                                   rotated, start_peer, stop, write_models)
from ops.bench.llm import banned_eos, model_path
from ops.redis_server import RedisServer
from ops.stack import ServiceProcesses

TOKENS = 128  # tokens each streamed answer generates


def parse_variant(values: list[str]) -> tuple[str, dict[str, str]]:
    """`NAME [VAR=VALUE ...]` -> (name, environment)."""
    name, *assignments = values
    environ = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{assignment!r} is not VAR=VALUE")
        environ[key] = value
    return name, environ


def start_variant(name: str, extra: dict[str, str], models: Path, work: Path, stack: ExitStack,
                  bias: dict) -> HttpStreams:
    redis_server = stack.enter_context(RedisServer(work / f"redis-{name}"))
    env = {**os.environ, **extra, "LOCALQ_REDIS_URL": redis_server.url, "LOCALQ_MODELS_DIR": str(models),
           "LOCALQ_FILES_DIR": str(work / f"files-{name}")}
    services = ServiceProcesses(env=env, log_dir=work / f"logs-{name}")
    stack.callback(services.stop)
    services.start_worker("cpu", "cpu")
    services.start_api()
    return HttpStreams(services.base_url, MODEL, bias, TOKENS)


def measure(args, path: Path, work: Path, peer_python: str | None) -> dict[tuple[str, str], list[float]]:
    bias = banned_eos(path)
    models = write_models(work / "models", path, args.threads, args.parallel, serial=False)
    figures: dict[tuple[str, str], list[float]] = {}
    with ExitStack() as stack:
        servers = {name: start_variant(name, extra, models, work, stack, bias) for name, extra in args.variant}
        if peer_python:
            peer, url = start_peer(peer_python, path, args.threads, args.peer_slots, work / "llama-server.log")
            stack.callback(stop, peer)
            servers["llama-server"] = HttpStreams(url, PEER_MODEL, bias, TOKENS)
        for server in servers.values():
            stack.callback(server.close)
            server.stream()  # warm: each system's first request is not what is measured
            server.concurrent(args.streams)
        singles = {"in-process": Local(path, args.threads, bias, TOKENS), **servers}
        singles["in-process"].stream()
        for turn in range(args.rounds):
            for _ in range(args.singles):
                for name, system in rotated(singles, turn):
                    sample = system.stream()
                    figures.setdefault(("first token ms", name), []).append(sample.ttft * 1000)
                    figures.setdefault(("decode tok/s", name), []).append(sample.decode_rate)
            for name, server in rotated(servers, turn):
                samples = server.concurrent(args.streams)
                figures.setdefault((f"{args.streams} streams tok/s", name), []).append(
                    concurrent_figures(samples, TOKENS)["aggregate_tokens_per_s"])
            print(f"round {turn + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return figures


def report(figures: dict[tuple[str, str], list[float]]) -> str:
    lines = []
    for metric in dict.fromkeys(metric for metric, _ in figures):
        lines.append(f"== {metric} (median; every round) ==")
        for (name_metric, name), values in figures.items():
            if name_metric == metric:
                lines.append(f"{name:16s} {statistics.median(values):8.1f}   {[round(v, 1) for v in values]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [VAR=VALUE]",
                        help="a localq stack: its name and extra environment (repeat for each)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--singles", type=int, default=2, help="single streams each system runs a round")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4, help="slots of each variant's model")
    parser.add_argument("--peer-slots", type=int, default=4)
    parser.add_argument("--peer-python", help="a Python that can import xllamacpp (default: a known venv)")
    args = parser.parse_args(argv)
    try:
        args.variant = [parse_variant(values) for values in args.variant]
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    path = model_path()
    peer_python = find_peer_python(args.peer_python)
    if peer_python is None:
        print("llama-server not found (pip install xllamacpp in a venv, then --peer-python); going without",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="localq-variants-") as work:
        figures = measure(args, path, Path(work), peer_python)
    print(f"model {path.name}, {args.threads} threads, {TOKENS} tokens a stream, greedy, end tokens banned; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} after")
    print(report(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
