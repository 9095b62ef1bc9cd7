"""llama-cpp backend (llama-cpp-python): chat, completions, embeddings and the tokenizer of a GGUF model.

Chat prompts are rendered with the model's own chat template (the GGUF's
`tokenizer.chat_template`, through llama-cpp-python's Jinja2ChatFormatter, exactly as
`create_chat_completion` renders them). Tokens are then generated with `Llama.generate`
directly rather than through `create_chat_completion(stream=True)`: that way every sampled token
passes through this module, so cancellation is checked between tokens, usage counts are exact
in stream and non-stream mode alike, log probabilities need no `logits_all` buffer (they are
read from the context's logits for the token just sampled), and stop sequences, `ignore_eos`,
`logit_bias` and OpenAI's `json_schema` response format (which llama-cpp-python's chat
handler does not implement) are handled in one place.

No work goes on for a prompt that cannot fit or a job no one waits for: prompts are tokenized in
linear time and only until they exceed the context (`llama_tokens`), a prompt too large for any
tokenization is refused untokenized, and the prompt is evaluated in `n_batch` chunks with the
job's cancel check between them (a long prompt's evaluation is the longest step before the
first token).
"""

from __future__ import annotations

import codecs
import ctypes
import json
import math
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jinja2
import llama_cpp
import numpy as np
from llama_cpp import Llama, LogitsProcessorList
from llama_cpp._internals import LlamaTokenDataArray
from llama_cpp.llama_chat_format import CHATML_CHAT_TEMPLATE, Jinja2ChatFormatter
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from schemas.openai_errors import context_length_exceeded, invalid
from workers import devices
from workers.backends.llama_tokens import PromptTokenizer
from workers.capabilities import Problem, too_long
from workers.config import ModelConfig
from workers.errors import JobError
from workers.fingerprint import fingerprint

_RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's "pick a random seed" value
_NEVER = -1e30  # a logit no other candidate loses to


@dataclass
class TokenLogprob:
    """One generated token's log probability and its most likely alternatives."""

    piece: bytes  # the token's bytes as generated
    logprob: float
    top: list[tuple[bytes, float]]  # alternatives, most likely first
    offset: int  # where its text starts in the generated text, in characters


@dataclass
class Piece:
    """Text ready to send, with the log probabilities of the tokens it completes."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LlamaCppBackend:
    """One loaded GGUF model."""

    def __init__(self, config: ModelConfig):
        path = config.locate_model()
        kwargs: dict[str, Any] = {
            "model_path": str(path),
            "n_ctx": config.context_tokens,
            "n_gpu_layers": devices.gpu_layers(config),  # 0 on the CPU and on a simulated GPU
            "embedding": bool(config.embeddings),
            "verbose": False,
        }
        if config.threads:
            kwargs["n_threads"] = kwargs["n_threads_batch"] = config.threads
        if config.mmap is not None:
            kwargs["use_mmap"] = config.mmap
        self.config = config
        self.llm = Llama(**kwargs)
        # llama.cpp may round the context up; the configured size is the one clients are told
        # (and the one the API checks requests against).
        self.n_ctx = min(self.llm.n_ctx(), config.context_tokens)
        self.n_vocab = self.llm.n_vocab()
        self._vocab = self.llm._model.vocab
        self._lock = threading.RLock()
        self._formatter = self._chat_formatter()
        self._tokens = PromptTokenizer(self.llm)
        self._eog: np.ndarray | None = None
        self.fingerprint = fingerprint(config, path, f"llama-cpp-python {llama_cpp.__version__}")

    def close(self) -> None:
        self.llm.close()

    # -- tokenizer -----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token text (like <|im_start|>) is parsed as such."""
        with self._lock:
            return self._tokens.tokenize(text.encode("utf-8"), add_special=add_special).tokens

    def detokenize(self, tokens: list[int]) -> str:
        """The text of `tokens`, special tokens included."""
        self.check_tokens(tokens, "tokens")
        with self._lock:
            return self.llm.detokenize(list(tokens), special=True).decode("utf-8", errors="replace")

    def check_tokens(self, tokens: list[int], param: str) -> None:
        for token in tokens:
            if not 0 <= token < self.n_vocab:
                raise JobError(
                    400,
                    f"Invalid token id {token} in '{param}': this model's token ids are 0 to {self.n_vocab - 1}.",
                    param=param,
                    code="invalid_value",
                )

    # -- prompts -------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict], cancelled: Callable[[], bool] = lambda: False) -> list[int] | None:
        """The chat rendered with the model's template, ready for the assistant's turn; None
        when `cancelled()` turned true on the way.

        Raises JobError (400 context_length_exceeded) as soon as the prompt is known not to fit.
        """
        if len(messages) >= self.n_ctx:  # every message costs a token: see capabilities._messages
            raise _error(too_long("messages", self.n_ctx, len(messages), at_least=True))
        plain = [_plain_message(m) for m in messages]
        if cancelled():
            return None
        try:
            prompt = self._formatter(messages=plain).prompt
        except (jinja2.TemplateError, ValueError, TypeError) as exc:
            raise JobError(
                400, f"The model's chat template cannot render these messages: {exc}", param="messages"
            ) from None
        return self._prompt_tokens(prompt, add_special=False, param="messages", cancelled=cancelled)

    def completion_prompt(
        self, prompt: str | list[int], param: str = "prompt", cancelled: Callable[[], bool] = lambda: False,
    ) -> tuple[list[int], str] | None:
        """(tokens, text) of a completions prompt given as text or as token ids; None when
        `cancelled()` turned true while it was tokenized."""
        if isinstance(prompt, str):
            tokens = self._prompt_tokens(prompt, add_special=True, param=param, cancelled=cancelled)
            if tokens is None:
                return None
            text = prompt
        else:
            self.check_tokens(prompt, param)
            tokens = list(prompt)
            with self._lock:
                text = self.llm.detokenize(tokens).decode("utf-8", errors="replace")
        if not tokens:  # generation needs something to condition on
            bos = self.llm.token_bos()
            tokens = [bos if bos >= 0 else self.llm.token_eos()]
        return tokens, text

    def _prompt_tokens(
        self, text: str, *, add_special: bool, param: str, cancelled: Callable[[], bool]
    ) -> list[int] | None:
        """Tokens of a prompt that fits the context; counting stops as soon as it cannot."""
        data = text.encode("utf-8")
        least = self._tokens.at_least(len(data))
        if least >= self.n_ctx:  # too large for any tokenization: do not tokenize at all
            raise _error(too_long(param, self.n_ctx, least, at_least=True))
        with self._lock:
            counted = self._tokens.tokenize(data, add_special=add_special, limit=self.n_ctx, cancelled=cancelled)
        if counted is None:
            return None
        if not counted.complete:
            raise _error(too_long(param, self.n_ctx, len(counted.tokens), at_least=True))
        return counted.tokens

    # -- generation ----------------------------------------------------------------------------

    def start(self, prompt_tokens: list[int], params: dict, *, param: str) -> Run:
        """Validate everything about one prompt's generation before any output is sent.

        `params` comes from `workers.sampling.resolve`; `param` names the prompt's field for
        errors ("messages" or "prompt").
        """
        if len(prompt_tokens) >= self.n_ctx:
            raise _error(too_long(param, self.n_ctx, len(prompt_tokens)))
        processors = []
        if params.get("logit_bias"):
            processors.append(self._logit_bias(params["logit_bias"]))
        if params.get("ignore_eos"):
            processors.append(self._ban_eog())
        return Run(self, list(prompt_tokens), params, grammar=self._grammar(params), processors=processors)

    def prefill(self, prompt: list[int], cancelled: Callable[[], bool]) -> bool:
        """Evaluate all of `prompt` but its last token, `n_batch` tokens at a time, asking
        `cancelled()` before each batch; False when it said yes. Call with the lock held.

        What the context already holds from an earlier prompt is kept (as `Llama.generate`
        would keep it). `generate` then finds the whole prefix cached and evaluates only the
        last token, whose logits the first sample needs.
        """
        llm, target = self.llm, len(prompt) - 1
        cached = llm._input_ids[:target]
        if len(cached):
            differs = np.flatnonzero(cached != np.asarray(prompt[: len(cached)], dtype=cached.dtype))
            kept = int(differs[0]) if len(differs) else len(cached)
        else:
            kept = 0
        if kept == 0 or not llm._ctx.kv_cache_seq_rm(-1, kept, -1):
            llm.reset()
        else:
            llm.n_tokens = kept
        for start in range(llm.n_tokens, target, llm.n_batch):
            if cancelled():
                return False
            llm.eval(prompt[start : min(start + llm.n_batch, target)])
        return not cancelled()

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def _eog_tokens(self) -> np.ndarray:
        if self._eog is None:
            self._eog = np.array([t for t in range(self.n_vocab) if self.is_eog(t)], dtype=np.intc)
        return self._eog

    def _ban_eog(self) -> Callable:
        banned = self._eog_tokens()

        def ban(_ids, scores):
            # Finite, not -inf: once a grammar is complete, end-of-generation is the only token
            # it allows, and it must stay selectable.
            scores[banned] = _NEVER
            return scores

        return ban

    def _logit_bias(self, bias: dict[int, float]) -> Callable:
        self.check_tokens(list(bias), "logit_bias")
        ids = np.array(list(bias), dtype=np.intc)
        values = np.array(list(bias.values()), dtype=np.single)

        def apply(_ids, scores):
            scores[ids] += values
            return scores

        return apply

    def _grammar(self, params: dict) -> str | None:
        """The GBNF text the answer must follow (from the grammar knob or response_format), checked."""
        text, param = params.get("grammar"), "x-localai-extensions.grammar"
        response_format = params.get("response_format") or {}
        if response_format.get("type") == "json_object":
            text, param = JSON_GBNF, "response_format"
        elif response_format.get("type") == "json_schema":
            param = "response_format.json_schema.schema"
            schema = (response_format.get("json_schema") or {}).get("schema")
            if schema is None:
                text = JSON_GBNF
            else:
                try:
                    text = json_schema_to_gbnf(json.dumps(schema))
                except Exception as exc:  # the converter raises bare Exceptions and ValueErrors
                    raise JobError(
                        400, f"This JSON schema cannot be enforced: {exc}", param=param, code="invalid_value"
                    ) from None
        if text is None:
            return None
        with self._lock:
            sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, text.encode("utf-8"), b"root")
            if not sampler:
                raise JobError(
                    400, "The grammar is not valid GBNF (llama.cpp could not parse it).", param=param,
                    code="invalid_value",
                )
            llama_cpp.llama_sampler_free(sampler)
        return text

    def _logprob(self, token: int, top: int) -> TokenLogprob:
        """Log probabilities from the logits of the position that produced `token`."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        peak = float(logits.max())
        norm = peak + math.log(float(np.exp(logits - peak).sum()))
        alternatives: list[tuple[bytes, float]] = []
        if top > 0:
            best = np.argpartition(-logits, top)[:top] if top < self.n_vocab else np.arange(self.n_vocab)
            best = best[np.argsort(-logits[best], kind="stable")]
            alternatives = [
                (self.llm.detokenize([int(t)], special=True), float(logits[t]) - norm) for t in best
            ]
        return TokenLogprob(self.llm.detokenize([token]), float(logits[token]) - norm, alternatives, 0)

    # -- embeddings ----------------------------------------------------------------------------

    def embed(
        self, inputs: list[str], *, dimensions: int | None, cancelled: Callable[[], bool]
    ) -> tuple[list[list[float]], list[int]] | None:
        """(L2-normalised vectors, each input's token count), or None when cancelled part way."""
        dims = self.llm.n_embd()
        if dimensions is not None and dimensions > dims:
            raise JobError(
                400, f"This model's embeddings have {dims} dimensions; 'dimensions' cannot be larger.",
                param="dimensions", code="invalid_value",
            )
        limit = self.llm.n_batch
        for index, text in enumerate(inputs):  # refused before tokenizing when no tokenization fits
            least = self._tokens.at_least(len(text.encode("utf-8")))
            if least > limit:
                raise _embed_too_long(limit, index, f"at least {least}")
        with self._lock:
            counts = [len(self.llm.tokenize(text.encode("utf-8"))) for text in inputs]
        for index, count in enumerate(counts):
            if count == 0:
                raise JobError(400, f"Input {index} is empty; there is nothing to embed.", param="input")
            if count > limit:
                raise _embed_too_long(limit, index, str(count))
        vectors: list[list[float]] = []
        for start in range(0, len(inputs), 16):
            if cancelled():
                return None
            with self._lock:
                batch = self.llm.embed(inputs[start : start + 16], truncate=False)
            for raw in batch:
                vector = np.asarray(raw, dtype=np.float32)
                if vector.ndim == 2:  # no pooling in the model: average the token vectors
                    vector = vector.mean(axis=0)
                if dimensions is not None:
                    vector = vector[:dimensions]
                vectors.append(_normalised(vector).tolist())
        return vectors, counts

    # -- helpers -------------------------------------------------------------------------------

    def _chat_formatter(self) -> Jinja2ChatFormatter:
        metadata = self.llm.metadata
        template = metadata.get("tokenizer.chat_template") or CHATML_CHAT_TEMPLATE
        eos, bos = self.llm.token_eos(), self.llm.token_bos()
        return Jinja2ChatFormatter(
            template=template,
            eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
            bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )


class Run:
    """A validated generation for one prompt; `choice` generates one answer from it."""

    def __init__(
        self, backend: LlamaCppBackend, prompt_tokens: list[int], params: dict, *,
        grammar: str | None, processors: list[Callable],
    ):
        self.backend = backend
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.grammar = grammar
        self.processors = processors
        top = params.get("top_logprobs")
        wants = params.get("logprobs")
        self.top_logprobs: int | None = (top or 0) if (wants is not None and wants is not False) else None

    def choice(self, seed: int | None, cancelled: Callable[[], bool]) -> Generation:
        return Generation(self, seed, cancelled)


class Generation:
    """One answer, produced while it is iterated: yields `Piece`s.

    Afterwards: `finish_reason` ("stop", "length", or "cancelled" when `cancelled()` turned
    true), `completion_tokens` (every token sampled, the end-of-generation token excepted, those
    inside a matched stop sequence included) and `text` (the answer, stop sequence cut off).
    """

    def __init__(self, run: Run, seed: int | None, cancelled: Callable[[], bool]):
        self._run = run
        self._seed = seed
        self._cancelled = cancelled
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.text = ""

    def __iter__(self) -> Iterator[Piece]:
        backend = self._run.backend
        with backend._lock:
            yield from self._generate(backend)

    def _generate(self, backend: LlamaCppBackend) -> Iterator[Piece]:
        run, params, llm = self._run, self._run.params, backend.llm
        prompt = run.prompt_tokens
        room = backend.n_ctx - len(prompt)
        limit = room if params.get("max_tokens") is None else min(params["max_tokens"], room)
        if limit <= 0:
            self.finish_reason = "length"
            return
        if not backend.prefill(prompt, self._cancelled):
            self.finish_reason = "cancelled"
            return
        llm.set_seed(secrets.randbelow(_RANDOM_SEED) if self._seed is None else self._seed % _RANDOM_SEED)
        last_n = params.get("repeat_last_n", 64)
        llm.last_n_tokens_size = backend.n_ctx if last_n == -1 else last_n
        stops: list[str] = params.get("stop") or []
        top = run.top_logprobs
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text, emitted, pending = "", 0, []
        finish, cut = "length", None
        grammar = _Grammar(backend, run.grammar) if run.grammar is not None else None
        processors = [*run.processors, grammar.mask] if grammar else run.processors
        tokens = llm.generate(
            prompt,
            top_k=params["top_k"],
            top_p=params["top_p"],
            min_p=params["min_p"],
            typical_p=params["typical_p"],
            temp=params["temperature"],
            repeat_penalty=params["repeat_penalty"],
            frequency_penalty=params["frequency_penalty"],
            presence_penalty=params["presence_penalty"],
            tfs_z=params["tfs_z"],
            mirostat_mode=params["mirostat_mode"],
            mirostat_tau=params["mirostat_tau"],
            mirostat_eta=params["mirostat_eta"],
            logits_processor=LogitsProcessorList(processors) if processors else None,
        )
        try:
            for token in tokens:
                if backend.is_eog(token):
                    finish = "stop"
                    break
                self.completion_tokens += 1
                if grammar is not None:
                    grammar.accept(token)
                start = len(text)
                info = backend._logprob(token, top) if top is not None else None
                text += decoder.decode(info.piece if info else llm.detokenize([token]))
                if info is not None:
                    info.offset = start
                    pending.append(info)
                cut = _find_stop(text, stops, emitted)
                if cut is not None:
                    text, finish = text[:cut], "stop"
                    break
                safe = len(text) - _held_back(text, stops, emitted)
                if safe > emitted:
                    yield Piece(text[emitted:safe], _take(pending, safe))
                    emitted = safe
                if self._cancelled():
                    self.finish_reason = "cancelled"
                    return
                if self.completion_tokens >= limit:
                    break
        finally:
            tokens.close()
            if grammar is not None:
                grammar.close()
        if cut is None:
            text += decoder.decode(b"", final=True)
            rest = pending
        else:  # tokens that only spelled the stop sequence are not part of the answer
            rest = [info for info in pending if info.offset < len(text)]
        if len(text) > emitted or rest:
            yield Piece(text[emitted:], rest)
        self.text = text
        self.finish_reason = finish


class _Grammar:
    """A llama.cpp grammar sampler kept out of the sampler chain.

    In the chain, a grammar that allows no token at all (it cannot be completed with this
    vocabulary, such as one demanding a NUL character) makes llama.cpp sample a token the
    grammar then rejects, which aborts the whole worker process. Here the grammar masks the
    candidates from a logits processor (the first stage of the chain, so later stages only
    see allowed tokens) and is told each accepted token; when nothing is allowed it lets only
    the end-of-generation token through, which ends the answer.
    """

    def __init__(self, backend: LlamaCppBackend, text: str):
        self._sampler = llama_cpp.llama_sampler_init_grammar(backend._vocab, text.encode("utf-8"), b"root")
        if not self._sampler:
            raise RuntimeError("grammar failed to parse after it was checked")
        self._array = LlamaTokenDataArray(n_vocab=backend.n_vocab)
        eos = backend.llm.token_eos()
        self._end = eos if eos >= 0 else int(backend._eog_tokens()[0])

    def mask(self, _ids, scores: np.ndarray) -> np.ndarray:
        self._array.copy_logits(scores)
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._array.candidates))
        masked = self._array.candidates_data.logit
        if np.isneginf(masked).all():
            masked[:] = -np.inf
            masked[self._end] = 0.0
        scores[:] = masked
        return scores

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None


def _find_stop(text: str, stops: list[str], start: int) -> int | None:
    """Where the earliest stop sequence begins at or after `start`, or None."""
    found = [index for index in (text.find(stop, start) for stop in stops) if index >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str], emitted: int) -> int:
    """How many trailing characters could be the start of a stop sequence (not sent yet)."""
    held = 0
    tail = len(text) - emitted
    for stop in stops:
        for size in range(min(len(stop) - 1, tail), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return held


def _take(pending: list[TokenLogprob], upto: int) -> list[TokenLogprob]:
    """Remove and return the entries whose text ends by character `upto`."""
    taken = []
    while pending and pending[0].offset < upto:
        taken.append(pending.pop(0))
    return taken


def _error(problem: Problem) -> JobError:
    param, message = problem
    return invalid(param, message, problem.code)


def _embed_too_long(limit: int, index: int, count: str) -> JobError:
    return context_length_exceeded(
        "input",
        f"This model can embed at most {limit} tokens per input. However, input {index} "
        f"resulted in {count} tokens. Please reduce its length.",
    )


def _plain_message(message: dict) -> dict:
    """An OpenAI message as chat templates expect it: role and a plain string content."""
    role = message.get("role")
    if role == "developer":
        role = "system"
    content = message.get("content")
    if isinstance(content, list):
        content = "\n".join(part.get("text") or part.get("refusal") or "" for part in content)
    return {"role": role, "content": content or ""}


def _normalised(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
