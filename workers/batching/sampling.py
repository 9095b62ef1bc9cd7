"""A sequence's sampler: llama.cpp's sampler chain, built from localq's resolved sampling parameters.

The stages and their order are those `Llama.generate` builds (penalties; then greedy at
temperature 0, mirostat, or top-k, typical, top-p, min-p, temperature and a seeded draw), so a
request samples the same way whether it runs alone or in a batch. Logit bias, banned tokens and
grammars are applied to the logits before the chain (the engine's `processors`). Logit bias is the
chain's first stage (llama.cpp's own sampler, first as in llama.cpp's server): in C, on the
candidates, so a plain biased request needs no pass over the logits in Python at every token.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp
import numpy as np

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed"
MIROSTAT_M = 100


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # -1: the whole context
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    seed: int = RANDOM_SEED
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias): checked against the vocabulary

    @property
    def plain_greedy(self) -> bool:
        """Temperature 0 with no penalty: the largest logit (after the bias) is the token."""
        return (self.temperature == 0 and self.repeat_penalty == 1.0 and self.frequency_penalty == 0.0
                and self.presence_penalty == 0.0)

    @classmethod
    def from_params(cls, params: dict, seed: int) -> Sampling:
        """From `workers.sampling.resolve`'s parameters and a 32-bit seed."""
        names = [name for name in cls.__dataclass_fields__ if name not in ("seed", "temperature", "logit_bias")]
        values = {name: params[name] for name in names if params.get(name) is not None}
        bias = tuple((int(token), float(value)) for token, value in (params.get("logit_bias") or {}).items())
        return cls(temperature=params.get("temperature", cls.temperature), seed=seed % RANDOM_SEED,
                   logit_bias=bias, **values)


class SamplerChain:
    """One llama.cpp sampler chain (it owns its stages); `close()` frees it.

    Plain greedy sampling (temperature 0, no penalty) needs no chain: the chain's stages would
    copy all the logits into a candidate array at every token only to add the bias and take the
    first largest logit. That is an argmax of the row with the bias added (the same float32
    additions, and numpy's argmax also takes the first of equal maxima), so the tokens are those
    the chain would pick, for a third less Python time per engine step with 16 sequences.
    """

    def __init__(self, sampling: Sampling, n_vocab: int, context: int = 0):
        self._chain = None
        self.n_vocab = n_vocab
        if sampling.plain_greedy:
            self._bias_ids = np.array([token for token, _ in sampling.logit_bias], dtype=np.intc)
            self._bias_values = np.array([value for _, value in sampling.logit_bias], dtype=np.single)
            return
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if not chain:
            raise RuntimeError("llama.cpp could not create a sampler chain")
        self._chain = chain
        if sampling.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(sampling.logit_bias))(*sampling.logit_bias)
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(biases), biases))  # copies them
        last_n = context if sampling.repeat_last_n == -1 else sampling.repeat_last_n
        self._add(llama_cpp.llama_sampler_init_penalties(
            n_vocab, last_n, sampling.repeat_penalty, sampling.frequency_penalty, sampling.presence_penalty))
        temperature, seed = sampling.temperature, sampling.seed
        if temperature < 0:
            self._add(llama_cpp.llama_sampler_init_dist(seed))
        elif temperature == 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
        elif sampling.mirostat_mode == 1:
            self._add(llama_cpp.llama_sampler_init_mirostat(
                n_vocab, seed, sampling.mirostat_tau, sampling.mirostat_eta, MIROSTAT_M))
        elif sampling.mirostat_mode == 2:
            self._add(llama_cpp.llama_sampler_init_mirostat_v2(seed, sampling.mirostat_tau, sampling.mirostat_eta))
        else:
            self._add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
            self._add(llama_cpp.llama_sampler_init_typical(sampling.typical_p, 1))
            self._add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
            self._add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
            self._add(llama_cpp.llama_sampler_init_temp(temperature))
            self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, stage) -> None:
        llama_cpp.llama_sampler_chain_add(self._chain, stage)

    def sample(self, ctx, index: int, row: np.ndarray | None = None) -> int:
        """Sample from the logits of batch position `index` (and accept the token); `row`: the
        same logits as an array, when the caller has it already."""
        if self._chain is not None:
            return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))
        if row is None:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, index), shape=(self.n_vocab,))
        if len(self._bias_ids):
            row[self._bias_ids] += self._bias_values  # in place, as the chain's stage does on its copy
        return int(np.argmax(row))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
