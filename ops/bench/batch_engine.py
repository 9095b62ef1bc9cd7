"""Benchmark: the batching engine (workers/batching) in-process, against one `Llama.generate` stream.

Loads the default chat GGUF once, then for each concurrency N runs N greedy sequences of `--tokens`
tokens each (end-of-generation banned, so every answer has exactly that length) through one
`BatchEngine` with N slots, and reports the aggregate tokens/s and each sequence's time to first
token. The reference is the same generation through `Llama.generate`, one at a time. Rounds take
turns, so background load falls on all alike. This measures the engine alone: no queue, no API.

    .venv/bin/python -m ops.bench.batch_engine [--tokens 128] [--rounds 3] [--concurrency 1,4,16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import Llama

from workers.batching.engine import BatchEngine, Sequence, Token
from workers.batching.sampling import Sampling
from workers.registry import ModelRegistry

MODELS = Path(__file__).resolve().parents[2] / "models"
QUESTION = "Tell me a long story about the sea."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    levels = [int(n) for n in args.concurrency.split(",")]

    config = ModelRegistry.load(MODELS).resolve("smollm2-135m-instruct")
    llm = Llama(model_path=str(config.locate_model()), n_ctx=1024, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    vocab = llm._model.vocab
    endings = np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)])
    prompt = llm.tokenize(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n".encode(),
                          add_bos=False, special=True)

    def never_end(row: np.ndarray) -> None:
        row[endings] = -1e30

    results: dict[str, list[dict]] = {"in-process Llama.generate": []}
    engines = {n: BatchEngine(llm._model.model, context_per_sequence=1024, parallel=n, threads=args.threads)
               for n in levels}
    try:
        for _ in range(args.rounds):
            results["in-process Llama.generate"].append(reference(llm, prompt, args.tokens, never_end))
            for n in levels:
                results.setdefault(f"engine, {n} at once", []).append(
                    batched(engines[n], prompt, args.tokens, n, never_end))
    finally:
        for engine in engines.values():
            engine.close()
    summary = {name: {"tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in runs), 1),
                      "first_token_ms_max": round(statistics.median(r["first_token_ms_max"] for r in runs), 1)}
               for name, runs in results.items()}
    base = summary["in-process Llama.generate"]["tokens_per_s"]
    for figures in summary.values():
        figures["vs_in_process"] = round(figures["tokens_per_s"] / base, 2)
    print(json.dumps(summary, indent=2))
    return 0


def reference(llm: Llama, prompt: list[int], tokens: int, never_end) -> dict:
    llm.reset()
    started = time.perf_counter()
    first = None
    produced = 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, logits_processor=[lambda ids, s: (never_end(s), s)[1]]):
        if first is None:
            first = time.perf_counter() - started
        produced += 1
        if produced >= tokens:
            break
    elapsed = time.perf_counter() - started
    return {"tokens_per_s": produced / elapsed, "first_token_ms_max": first * 1000}


def batched(engine: BatchEngine, prompt: list[int], tokens: int, count: int, never_end) -> dict:
    firsts: list[float] = []
    lock = threading.Lock()
    started = time.perf_counter()
    sequences = [engine.submit(Sequence(prompt, Sampling(temperature=0), tokens, processors=[never_end]))
                 for _ in range(count)]

    def read(sequence: Sequence) -> None:
        for item in sequence.stream():
            if isinstance(item, Token):
                with lock:
                    firsts.append(time.perf_counter() - started)
                break
        for _ in sequence.stream():
            pass

    readers = [threading.Thread(target=read, args=(sequence,)) for sequence in sequences]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    elapsed = time.perf_counter() - started
    produced = sum(sequence.generated for sequence in sequences)
    return {"tokens_per_s": produced / elapsed, "first_token_ms_max": max(firsts) * 1000}


if __name__ == "__main__":
    raise SystemExit(main())
