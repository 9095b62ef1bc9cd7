"""The batching engine (workers/batching) on the real SmolLM2 GGUF: sequences decoded together give
what they give alone, a cancelled one frees its slot while the others go on, prompts are read in
chunks between decode steps, slots reuse a shared prefix."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

from workers.batching.engine import BatchEngine, Finished, Sequence, Token
from workers.batching.sampling import Sampling
from workers.registry import ModelRegistry

MODELS = Path(__file__).resolve().parent.parent / "models"
CONTEXT = 1024
GREEDY = Sampling(temperature=0)
QUESTIONS = ["Tell me about the sea.", "What is 2+2?", "Name three colors.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def llm():
    config = ModelRegistry.load(MODELS).resolve("smollm2-135m-instruct")
    model = Llama(model_path=str(config.locate_model()), n_ctx=256, n_threads=2, verbose=False)
    yield model
    model.close()


@pytest.fixture
def engine(llm):
    running = BatchEngine(llm._model.model, context_per_sequence=CONTEXT, parallel=4, threads=2)
    yield running
    running.close()


def prompt(llm, question: str) -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return llm.tokenize(text.encode(), add_bos=False, special=True)


def collect(sequence: Sequence) -> tuple[list[int], Finished]:
    tokens = []
    for item in sequence.stream():
        if isinstance(item, Token):
            tokens.append(item.id)
        else:
            return tokens, item
    raise AssertionError("no end")


def run_alone(llm, engine, question: str, max_tokens: int = 48, sampling: Sampling = GREEDY) -> list[int]:
    tokens, end = collect(engine.submit(Sequence(prompt(llm, question), sampling, max_tokens)))
    assert end.reason in ("stop", "length")
    return tokens


def test_sequences_decoded_together_give_what_they_give_alone(llm, engine):
    alone = [run_alone(llm, engine, question) for question in QUESTIONS]
    steps_before = engine.steps
    together = [engine.submit(Sequence(prompt(llm, q), GREEDY, 48)) for q in QUESTIONS]
    results = [collect(sequence) for sequence in together]
    assert [tokens for tokens, _ in results] == alone
    assert all(tokens for tokens in alone)
    # one decode step served them all: far fewer steps than tokens
    assert engine.steps - steps_before <= max(len(tokens) for tokens in alone) + 2


def test_a_seeded_sequence_is_reproducible_alone_and_in_a_batch(llm, engine):
    seeded = Sampling(temperature=0.9, top_p=0.95, seed=1234)
    alone = run_alone(llm, engine, QUESTIONS[0], sampling=seeded)
    assert run_alone(llm, engine, QUESTIONS[0], sampling=seeded) == alone
    others = [engine.submit(Sequence(prompt(llm, q), Sampling(temperature=0.9, seed=n), 48))
              for n, q in enumerate(QUESTIONS[1:])]
    mine = engine.submit(Sequence(prompt(llm, QUESTIONS[0]), seeded, 48))
    assert collect(mine)[0] == alone
    for other in others:
        collect(other)


def test_a_cancelled_sequence_frees_its_slot_and_the_others_go_on(llm, engine):
    alone = [run_alone(llm, engine, q, max_tokens=64) for q in QUESTIONS[:3]]
    running = [engine.submit(Sequence(prompt(llm, q), GREEDY, 64)) for q in QUESTIONS[:3]]
    waiting = [engine.submit(Sequence(prompt(llm, QUESTIONS[3]), GREEDY, 8)) for _ in range(2)]
    victim = running[1]
    stream = victim.stream()
    next(stream)  # it is generating
    victim.cancel()
    rest = list(stream)
    assert isinstance(rest[-1], Finished) and rest[-1].reason == "cancelled"
    assert collect(running[0])[0] == alone[0] and collect(running[2])[0] == alone[2]
    for sequence in waiting:  # four slots, five sequences: the freed slot served the last one
        assert collect(sequence)[1].reason in ("stop", "length")
    assert engine.busy_slots == 0 and engine.waiting == 0


def test_a_long_prompt_is_read_in_chunks_while_others_decode(llm):
    engine = BatchEngine(llm._model.model, context_per_sequence=CONTEXT, parallel=2, threads=2, prefill_chunk=16)
    try:
        vocab = llm._model.vocab
        endings = [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]

        def never_end(row: np.ndarray) -> None:
            row[endings] = -1e30

        short = engine.submit(Sequence(prompt(llm, QUESTIONS[1]), GREEDY, 300, processors=[never_end]))
        stream = short.stream()
        next(stream)  # decoding
        long_prompt = prompt(llm, "Summarise this: " + "the quick brown fox jumps over the lazy dog. " * 30)
        assert len(long_prompt) > 300
        at_first_token = []
        long = Sequence(long_prompt, GREEDY, 4, on_token=lambda _: at_first_token.append(short.generated))
        before = short.generated
        engine.submit(long)
        assert collect(long)[1].reason in ("stop", "length")
        # the short one kept getting a token per step while the long prompt went in 16 at a time
        assert at_first_token[0] - before >= 10
        short.cancel()
        list(stream)
    finally:
        engine.close()


def test_a_shared_prefix_is_read_once(llm, engine):
    first = prompt(llm, "You are a pirate. Answer briefly: what is the capital of France?")
    cold = engine.submit(Sequence(first, GREEDY, 4))
    cold_tokens = collect(cold)[0]
    assert cold.cached_tokens == 0  # a new engine: nothing cached yet
    again = engine.submit(Sequence(first, GREEDY, 4))
    assert collect(again)[0] == cold_tokens
    assert again.cached_tokens == len(first) - 1  # all but the last token, whose logits are needed
    other = prompt(llm, "You are a pirate. Answer briefly: what is the capital of Spain?")
    partial = engine.submit(Sequence(other, GREEDY, 4))
    collect(partial)
    assert 0 < partial.cached_tokens < len(other) - 1


def test_max_tokens_logprobs_and_processors(llm, engine):
    alone = run_alone(llm, engine, QUESTIONS[2], max_tokens=6)
    banned = alone[0]

    def ban(row: np.ndarray) -> None:
        row[banned] = -np.inf

    sequence = engine.submit(Sequence(prompt(llm, QUESTIONS[2]), GREEDY, 6, processors=[ban], top_logprobs=3))
    items = list(sequence.stream())
    tokens = [item for item in items if isinstance(item, Token)]
    assert items[-1].reason == "length" and len(tokens) == 6
    assert banned not in [token.id for token in tokens]
    first = tokens[0].logprob
    assert len(first.top) == 3 and first.top[0][0] == banned  # the raw logits still rank it first
    assert first.logprob <= first.top[0][1] and all(lp <= 0 for _, lp in first.top)


def test_siblings_share_the_prompt_read_once(llm, engine):
    question = prompt(llm, "List five animals that live in the ocean, with one fact each.")
    leader = Sequence(question, GREEDY, 24)
    siblings = [Sequence(question, GREEDY, 24, after=leader) for _ in range(3)]
    for sequence in (leader, *siblings):
        engine.submit(sequence)
    answers = [collect(sequence)[0] for sequence in (leader, *siblings)]
    assert answers[1:] == [answers[0]] * 3  # greedy: the same answer, from the same cache
    assert leader.cached_tokens == 0
    assert [sibling.cached_tokens for sibling in siblings] == [len(question) - 1] * 3


def test_a_prefix_held_by_a_busy_slot_is_copied_not_read_again(llm, engine):
    system = "You are a helpful assistant who answers in exactly one short sentence. " * 4
    first = prompt(llm, system + "What is the sun?")
    busy = engine.submit(Sequence(first, GREEDY, 200))
    stream = busy.stream()
    next(stream)  # the first slot holds its prompt and is still generating
    second = prompt(llm, system + "What is the moon?")
    other = engine.submit(Sequence(second, GREEDY, 8))
    copied = collect(other)[0]
    assert other.cached_tokens >= len(prompt(llm, system)) - 4  # the shared system text, from the busy slot
    busy.cancel()
    list(stream)
    fresh = BatchEngine(llm._model.model, context_per_sequence=CONTEXT, parallel=1, threads=2)
    try:
        assert collect(fresh.submit(Sequence(second, GREEDY, 8)))[0] == copied
    finally:
        fresh.close()


def test_logit_bias_is_a_stage_of_the_sequences_own_chain(llm, engine):
    """Bias goes to llama.cpp's sampler in C (no Python pass over the logits): it bans and forces
    tokens of its own sequence only, whatever runs beside it, and leaves logprobs raw."""
    alone = run_alone(llm, engine, QUESTIONS[1], max_tokens=6)
    banned, forced = alone[0], alone[1]
    neighbours = [engine.submit(Sequence(prompt(llm, q), GREEDY, 6)) for q in QUESTIONS[1:3]]
    without = engine.submit(Sequence(prompt(llm, QUESTIONS[1]), Sampling(temperature=0, logit_bias=((banned, -100.0),)),
                                     6, top_logprobs=1))
    pushed = engine.submit(Sequence(prompt(llm, QUESTIONS[1]), Sampling(temperature=0, logit_bias=((forced, 100.0),)), 6))
    items = list(without.stream())
    assert banned not in [item.id for item in items if isinstance(item, Token)]
    assert items[0].logprob.top[0][0] == banned  # ranked on the raw logits, before the bias
    assert collect(pushed)[0] == [forced] * 6
    assert [collect(sequence)[0] for sequence in neighbours][0] == alone


def test_sampling_takes_logit_bias_from_resolved_parameters():
    sampling = Sampling.from_params({"temperature": 0, "logit_bias": {15: -100.0, 7: 2.0}}, 1)
    assert sampling.logit_bias == ((15, -100.0), (7, 2.0))
    assert Sampling.from_params({"temperature": 0, "logit_bias": None}, 1).logit_bias == ()


def test_plain_greedy_takes_the_tokens_the_sampler_chain_takes(llm, engine, monkeypatch):
    """Temperature 0 without penalties is an argmax in numpy, not a llama.cpp chain that copies
    every logit into candidates at each token: the same tokens, bias included."""
    biased = Sampling(temperature=0, logit_bias=((run_alone(llm, engine, QUESTIONS[3], max_tokens=1)[0], -100.0),
                                                 (1000, 5.0)))
    assert biased.plain_greedy and not Sampling(temperature=0, repeat_penalty=1.1).plain_greedy

    def decoded() -> list[list[int]]:
        together = [engine.submit(Sequence(prompt(llm, q), sampling, 24))
                    for q in QUESTIONS for sampling in (GREEDY, biased)]
        return [collect(sequence)[0] for sequence in together]

    fast = decoded()
    monkeypatch.setattr(Sampling, "plain_greedy", property(lambda self: False))
    assert decoded() == fast
    assert fast[6] != fast[7]  # the bias changed that answer


def _token_prelude(tokens: list[int]):
    """A prelude that reads `tokens` itself, as an image's would read its embeddings."""

    def read(ctx, seq_id: int) -> int:
        batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
        try:
            for position, token in enumerate(tokens):
                batch.token[position], batch.pos[position], batch.n_seq_id[position] = token, position, 1
                batch.seq_id[position][0], batch.logits[position] = seq_id, False
            batch.n_tokens = len(tokens)
            assert llama_cpp.llama_decode(ctx, batch) == 0
        finally:
            llama_cpp.llama_batch_free(batch)
        return len(tokens)

    return read


def test_a_prelude_read_into_the_slot_gives_what_the_plain_prompt_gives(llm, engine):
    question = QUESTIONS[0]
    tokens = prompt(llm, question)
    alone = run_alone(llm, engine, question)
    head = len(tokens) - 5
    placeholders = [-(10_000 + i) for i in range(head)]
    with_prelude = Sequence(placeholders + tokens[head:], GREEDY, 48, prelude=_token_prelude(tokens[:head]))
    got, end = collect(engine.submit(with_prelude))
    assert end.reason in ("stop", "length") and got == alone
    assert with_prelude.cached_tokens == 0  # read, not found in a cache


def test_a_failing_prelude_ends_its_sequence_and_frees_the_slot(llm, engine):
    def broken(ctx, seq_id):
        raise RuntimeError("no image")

    def short(ctx, seq_id):
        return 1

    for prelude in (broken, short):
        failed = engine.submit(Sequence([-1, -2, *prompt(llm, "Hi")], GREEDY, 8, prelude=prelude))
        _, end = collect(failed)
        assert end.reason == "error"
    assert engine.busy_slots == 0
    assert run_alone(llm, engine, QUESTIONS[1], max_tokens=4)
