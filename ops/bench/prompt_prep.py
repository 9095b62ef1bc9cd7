"""Benchmark: preparing a chat prompt of N short messages (issue 10, finding 2).

For each N it times, on the shipped SmolLM2 model's tokenizer:

1. render: the model's chat template over the N messages (Jinja2, as the worker renders it);
2. one call: llama.cpp tokenizing the rendered prompt in one call (what the worker did before:
   its special-token pass is quadratic in the number of chat-template markers);
3. pieces: the worker's tokenizer (`workers.backends.llama_tokens`), which cuts the prompt into
   pieces of a bounded number of markers: the same tokens, in linear time;
4. refused: the worker's whole preparation (`LlamaCppBackend.chat_prompt`) of a prompt that does
   not fit the model's 2048-token context, which stops at the context size.

Run it by hand (the one-call column takes about a minute at 20,000 messages on a slow core):

    .venv/bin/python -m ops.bench.prompt_prep --sizes 5000 10000 20000
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from api.settings import DEFAULT_MODELS_DIR
from workers.errors import JobError
from workers.registry import ModelRegistry

CHAT_MODEL = "gpt-4o-mini"


def timed(action) -> tuple[float, object]:
    started = time.perf_counter()
    outcome = action()
    return time.perf_counter() - started, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 20000])
    parser.add_argument("--content", default="hello there", help="every message's text")
    args = parser.parse_args()

    from workers.backends.llama_cpp import LlamaCppBackend  # here: loads llama_cpp, after --help and argument errors

    config = replace(ModelRegistry.load(DEFAULT_MODELS_DIR).resolve(CHAT_MODEL), threads=1)
    backend = LlamaCppBackend(config)
    print(f"{'messages':>9} {'tokens':>8} {'render s':>9} {'one call s':>11} {'pieces s':>9} {'refused s':>10}")
    for size in args.sizes:
        messages = [{"role": "user", "content": args.content}] * size
        render, prompt = timed(lambda: backend._formatter(messages=messages).prompt.encode("utf-8"))
        whole_s, whole = timed(lambda: backend.llm.tokenize(prompt, add_bos=False, special=True))
        split_s, split = timed(lambda: backend._tokens.tokenize(prompt, add_special=False).tokens)
        assert split == whole, "the pieces must give the tokens of one call"

        def refuse():
            try:
                backend.chat_prompt(messages)
            except JobError as error:
                return error.code
            return "accepted"

        refused_s, code = timed(refuse)
        assert code == "context_length_exceeded"
        print(f"{size:>9} {len(whole):>8} {render:>9.3f} {whole_s:>11.3f} {split_s:>9.3f} {refused_s:>10.4f}")
    backend.close()


if __name__ == "__main__":
    main()
