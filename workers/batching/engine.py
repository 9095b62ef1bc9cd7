"""Continuous batching on llama.cpp: one context decodes up to `parallel` sequences at once.

Each step runs one `llama_decode` holding the last sampled token of every decoding sequence, and
one holding the next prompt chunks (at most `prefill_chunk` tokens of each prompt being read, so a
long prompt goes in over several steps while the others keep decoding). Every sequence samples from
its own logits row with its own sampler chain (`workers.batching.sampling`). A finished or
cancelled sequence frees its slot at the next step.

Each slot is a sequence id with its own KV stream of the model's context size, and keeps the cache
of its last sequence: a new prompt goes to the free slot sharing its longest prefix and reads only
what differs (`Sequence.cached_tokens`). Separate streams, and decode rows never batched with
prompt chunks, keep a sequence's numbers independent of its neighbours: at temperature 0 it gives
the same tokens alone or in a batch.

All llama.cpp calls happen on the engine's own thread; other threads submit, cancel and read
tokens through each `Sequence`'s queue.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence as Tokens
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from workers.batching.sampling import Sampling, SamplerChain

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 256
WAIT_POLL = 0.1  # seconds between cancel checks of a reader waiting for a token
RATE_WINDOW = 5.0  # seconds over which `stats()` reports tokens per second


@dataclass
class TokenLogprob:
    """Log probability of a sampled token and its most likely alternatives (token ids)."""

    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Token:
    id: int
    logprob: TokenLogprob | None = None


@dataclass
class Finished:
    """The last item of a sequence's stream: why it ended ("stop", "length", "cancelled", "error")."""

    reason: str
    error: str = ""


class Sequence:
    """One generation: its prompt, how it samples, and the tokens the engine produced for it.

    `processors` change a logits row in place before sampling (logit bias, banned tokens, a
    grammar's mask); `on_token(id)` is told each sampled token but the end one (a grammar's state). Generation
    ends at an end-of-generation token (not delivered), after `max_tokens`, or on `cancel()`.
    """

    def __init__(
        self,
        prompt: Tokens[int],
        sampling: Sampling,
        max_tokens: int,
        *,
        processors: Tokens[Callable[[np.ndarray], None]] = (),
        on_token: Callable[[int], None] | None = None,
        top_logprobs: int | None = None,
        after: Sequence | None = None,
        prelude: Callable[[llama_cpp.llama_context_p, int], int] | None = None,
    ):
        if not prompt:
            raise ValueError("a sequence needs at least one prompt token")
        self.prompt = list(prompt)
        # what the prompt starts with that is not tokens (images): `prelude(ctx, seq_id)` reads it
        # into the slot's KV stream and returns the position after it; the prompt holds a
        # placeholder (a negative id, matching no other prompt's) for each of those positions
        self.prelude = prelude
        self.sampling = sampling
        self.max_tokens = max_tokens
        self.processors = list(processors)
        self.on_token = on_token
        self.top_logprobs = top_logprobs
        self.after = after  # a sibling with the same prompt: admitted once that one has read it
        self.cached_tokens = 0  # prompt tokens found in the slot's cache, not read again
        self.generated = 0
        self.finish: Finished | None = None
        self._cancelled = threading.Event()
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        # engine-side state
        self.n_past = 0  # tokens of this sequence in the KV cache
        self.pending: int | None = None  # sampled, not yet fed back
        self.chain: SamplerChain | None = None
        self._admitted: tuple[int, int] = (0, 0)  # (engine step, slot) when it got its slot

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stream(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Token | Finished]:
        """Tokens as they come, then one `Finished`; `cancelled()` is asked while waiting and
        cancels the sequence when it turns true."""
        while True:
            if not self.cancelled and cancelled():
                self.cancel()
            try:
                item = self._out.get(timeout=WAIT_POLL)
            except queue.Empty:
                continue
            yield item
            if isinstance(item, Finished):
                return

    # -- engine side --------------------------------------------------------------------------

    def _deliver(self, item: Token | Finished) -> None:
        if isinstance(item, Finished):
            self.finish = item
        self._out.put(item)


@dataclass
class Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # the tokens its KV cache holds, in order
    sequence: Sequence | None = None


class BatchEngine:
    """Up to `parallel` sequences of one loaded model, decoded together on the engine's thread."""

    def __init__(
        self,
        model: llama_cpp.llama_model_p,
        *,
        context_per_sequence: int,
        parallel: int,
        n_batch: int = 512,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        threads: int | None = None,
        threads_batch: int | None = None,
        offload_kqv: bool = True,
    ):
        if parallel < 1:
            raise ValueError("parallel must be 1 or more")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = context_per_sequence * parallel
        params.n_batch = params.n_ubatch = max(n_batch, parallel)
        params.n_seq_max = parallel
        # One KV stream per slot, not one cache shared by all: a sequence's attention then spans
        # only its own cells, so its numbers do not depend on what other slots hold.
        params.kv_unified = False
        params.offload_kqv = offload_kqv
        # llama.cpp's own default is 4 threads whatever the machine: on 2 cores they spin against
        # everything else the worker does. `threads` decode one row, `threads_batch` several.
        if threads:
            params.n_threads = params.n_threads_batch = threads
        if threads_batch:
            params.n_threads_batch = threads_batch
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context for the batching engine")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.context_per_sequence = context_per_sequence
        self.parallel = parallel
        self.n_batch = int(params.n_batch)
        self.prefill_chunk = max(1, min(prefill_chunk, self.n_batch))
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.slots = [Slot(i) for i in range(parallel)]
        self._waiting: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.steps = 0  # llama_decode calls so far (for tests and metrics)
        self.prompt_tokens = 0  # prompt tokens of the sequences admitted so far
        self.cached_tokens = 0  # of those, found in a slot's cache (not read again)
        self.generated_tokens = 0  # tokens sampled so far
        self._rate = _Rate(RATE_WINDOW)
        self._thread = threading.Thread(target=self._run, name="llama-batch-engine", daemon=True)
        self._thread.start()

    # -- what other threads call ---------------------------------------------------------------

    def submit(self, sequence: Sequence) -> Sequence:
        if len(sequence.prompt) + 1 > self.context_per_sequence:
            raise ValueError("the prompt does not fit the context")
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.append(sequence)
            self._wake.notify()
        return sequence

    def poke(self) -> None:
        """Wake the engine (a sequence was cancelled while the engine had nothing else to do)."""
        with self._wake:
            self._wake.notify()

    @property
    def busy_slots(self) -> int:
        return sum(slot.sequence is not None for slot in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def kv_bytes(self) -> int:
        """About what the engine's KV cache takes: a key and a value row (16-bit) per layer for
        every token of every slot's context. Counted in the worker's model budget."""
        model = llama_cpp.llama_get_model(self.ctx)
        heads = max(1, llama_cpp.llama_model_n_head(model))
        row = llama_cpp.llama_model_n_embd(model) // heads * llama_cpp.llama_model_n_head_kv(model)
        return int(llama_cpp.llama_n_ctx(self.ctx)) * llama_cpp.llama_model_n_layer(model) * 2 * row * 2

    def stats(self) -> dict:
        """What a worker's heartbeat reports of this engine (`tasks.worker_signals`)."""
        return {"parallel": self.parallel, "running": self.busy_slots, "waiting": self.waiting,
                "steps": self.steps, "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "generated_tokens": self.generated_tokens,
                "tokens_per_second": round(self._rate.per_second(self.generated_tokens), 1)}

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        for sequence in [*self._waiting, *(slot.sequence for slot in self.slots if slot.sequence)]:
            self._end(sequence, Finished("error", "the model was unloaded"))
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        self.ctx = None

    # -- the engine's thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._has_work():
                    self._wake.wait(WAIT_POLL)
                if self._closed:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - a bug here must not leave readers waiting forever
                log.exception("batching engine step failed")
                for slot in self.slots:
                    if slot.sequence is not None:
                        self._free(slot, Finished("error", "the engine failed"), forget=True)

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(slot.sequence is not None for slot in self.slots)

    def step(self) -> None:
        """Admit waiting sequences, decode one token of every decoding sequence, read prompt chunks.

        Decode rows and prompt chunks never share a `llama_decode`: llama.cpp's kernels differ with
        the size of a batch, so a sequence's logits would depend on what else was in its batch.
        Kept apart, a decode batch holds one row per sequence and a prompt is read in the same
        chunks whatever runs beside it: at temperature 0 a sequence gives the same tokens alone
        or in a batch. A prompt's last token is decoded as a decode row (its logits give the
        first answer token), as when the prompt runs alone."""
        self._reap()
        self._admit()
        decoding = [slot for slot in self.slots if slot.sequence is not None and slot.sequence.pending is not None]
        if decoding:
            self._batch.n_tokens = 0
            rows = []
            for slot in decoding:
                rows.append((slot, self._add(slot, slot.sequence.pending, logits=True)))
                slot.sequence.pending = None
            if self._decode(decoding):
                for slot, index in rows:
                    self._sample(slot, index)
        reading = self._prefilling()
        if reading:
            self._batch.n_tokens = 0
            chunked = []
            for slot in reading:
                sequence = slot.sequence
                start, end = sequence.n_past, len(sequence.prompt) - 1
                take = min(self.prefill_chunk, end - start)
                if chunked and self._batch.n_tokens + take > self.n_batch:
                    break  # its chunk waits for the next step, whole: chunk edges never depend on others
                for token in sequence.prompt[start : start + take]:
                    self._add(slot, token, logits=False)
                chunked.append(slot)
            if self._decode(chunked):
                for slot in chunked:
                    sequence = slot.sequence
                    if sequence.n_past == len(sequence.prompt) - 1:
                        sequence.pending = sequence.prompt[-1]

    def _decode(self, slots: list[Slot]) -> bool:
        """One llama_decode of the batch; on failure the sequences of `slots` end with an error."""
        status = llama_cpp.llama_decode(self.ctx, self._batch)
        self.steps += 1
        if status == 0:
            return True
        log.error("llama_decode returned %d for a batch of %d tokens", status, self._batch.n_tokens)
        for slot in slots:
            if slot.sequence is not None:
                self._free(slot, Finished("error", f"llama_decode failed ({status})"), forget=True)
        return False

    def _prefilling(self) -> list[Slot]:
        """Slots still reading their prompt (all but its last token), oldest admission first."""
        busy = [slot for slot in self.slots if slot.sequence is not None and slot.sequence.pending is None
                and slot.sequence.generated == 0 and slot.sequence.n_past < len(slot.sequence.prompt) - 1]
        return sorted(busy, key=lambda slot: slot.sequence._admitted)

    def _add(self, slot: Slot, token: int, *, logits: bool) -> int:
        batch, index = self._batch, self._batch.n_tokens
        sequence = slot.sequence
        batch.token[index] = token
        batch.pos[index] = sequence.n_past
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = slot.seq_id
        batch.logits[index] = logits
        batch.n_tokens = index + 1
        sequence.n_past += 1
        slot.cached.append(token)
        return index

    def _sample(self, slot: Slot, index: int) -> None:
        sequence = slot.sequence
        if sequence is None or sequence.cancelled:
            return  # freed at the next step
        raw = row = None
        if sequence.processors or sequence.top_logprobs is not None:  # else the sampler reads the logits alone
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
            raw = row.copy() if sequence.top_logprobs is not None else None  # before any processor
            for processor in sequence.processors:
                processor(row)
        token = sequence.chain.sample(self.ctx, index, row)
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._free(slot, Finished("stop"))
            return
        if sequence.on_token is not None:  # not for the end token: a grammar may refuse it (and abort)
            sequence.on_token(token)
        info = _logprobs(raw, token, sequence.top_logprobs) if raw is not None else None
        sequence.generated += 1
        self.generated_tokens += 1
        sequence._deliver(Token(token, info))
        if sequence.generated >= sequence.max_tokens or sequence.n_past >= self.context_per_sequence:
            self._free(slot, Finished("length"))
        else:
            sequence.pending = token

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.sequence is not None and slot.sequence.cancelled:
                self._free(slot, Finished("cancelled"))
        with self._wake:
            cancelled = [sequence for sequence in self._waiting if sequence.cancelled]
            for sequence in cancelled:
                self._waiting.remove(sequence)
        for sequence in cancelled:
            self._end(sequence, Finished("cancelled"))

    def _admit(self) -> None:
        """Give free slots to waiting sequences, in order; a sequence waiting on another
        (`after`, a sibling of an n > 1 request) is admitted once that one has read its prompt."""
        while True:
            free = [slot for slot in self.slots if slot.sequence is None]
            with self._wake:
                ready = next((s for s in self._waiting if not _reading(s.after)), None) if free else None
                if ready is None:
                    return
                self._waiting.remove(ready)
            sequence = ready
            try:
                sequence.chain = SamplerChain(sequence.sampling, self.n_vocab, self.context_per_sequence)
            except Exception as exc:  # noqa: BLE001 - its reader must hear of it, not wait forever
                log.exception("cannot build a sampler chain")
                self._end(sequence, Finished("error", f"cannot build the sampler: {exc}"))
                continue
            slot = max(free, key=lambda candidate: _common_prefix(candidate.cached, sequence.prompt))
            keep = cached = self._reuse(slot, sequence.prompt)
            if sequence.prelude is not None and keep < _placeholders(sequence.prompt):
                keep, cached = self._read_prelude(slot, sequence), 0  # read now, not found in a cache
                if keep is None:
                    continue
            sequence.n_past, sequence.cached_tokens = keep, cached
            self.prompt_tokens += len(sequence.prompt)
            self.cached_tokens += cached
            if keep == len(sequence.prompt) - 1:
                sequence.pending = sequence.prompt[-1]  # nothing left to read but the last token
            sequence._admitted = self.steps, slot.seq_id
            slot.sequence = sequence

    def _read_prelude(self, slot: Slot, sequence: Sequence) -> int | None:
        """Read `sequence`'s prelude into `slot` (from nothing); the position after it, or None
        when it failed (the sequence then ends with an error and the slot stays free)."""
        llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        slot.cached.clear()
        expected = _placeholders(sequence.prompt)
        try:
            reached = sequence.prelude(self.ctx, slot.seq_id)
        except Exception as exc:  # noqa: BLE001 - its reader must hear of it
            log.exception("reading a prompt's media failed")
            reached, error = -1, str(exc)
        else:
            error = f"reading the prompt's media reached position {reached}, not {expected}"
        if reached != expected:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            self._end(sequence, Finished("error", error))
            return None
        slot.cached.extend(sequence.prompt[:expected])
        return expected

    def _reuse(self, slot: Slot, prompt: list[int]) -> int:
        """Leave in `slot`'s cache the longest prefix of `prompt` any slot holds (never the last
        token, whose logits are needed); how many tokens that is.

        Another slot's prefix is taken by copying its whole KV stream, then cutting it: llama.cpp
        copies between streams only whole (a partial `llama_memory_seq_cp` aborts the process)."""
        limit = len(prompt) - 1
        own = min(_common_prefix(slot.cached, prompt), limit)
        source = max(self.slots, key=lambda candidate: _common_prefix(candidate.cached, prompt))
        best = min(_common_prefix(source.cached, prompt), limit)
        memory, target = self.memory, slot.seq_id
        if best > own and source is not slot:
            llama_cpp.llama_memory_seq_rm(memory, target, -1, -1)
            llama_cpp.llama_memory_seq_cp(memory, source.seq_id, target, -1, -1)
            slot.cached = list(source.cached)
            own = best
        if own == 0 or not llama_cpp.llama_memory_seq_rm(memory, target, own, -1):
            llama_cpp.llama_memory_seq_rm(memory, target, -1, -1)
            own = 0
        del slot.cached[own:]
        return own

    def _free(self, slot: Slot, finish: Finished, *, forget: bool = False) -> None:
        sequence, slot.sequence = slot.sequence, None
        if forget:  # its cache state is unknown: start that slot afresh
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
            slot.cached.clear()
        elif sequence.pending is not None:
            sequence.pending = None  # sampled but never fed: not in the cache
        self._end(sequence, finish)

    def _end(self, sequence: Sequence, finish: Finished) -> None:
        if sequence.chain is not None:
            sequence.chain.close()
            sequence.chain = None
        sequence._deliver(finish)


class _Rate:
    """A counter's rate over about the last `window` seconds, from readings taken when asked."""

    def __init__(self, window: float):
        self.window = window
        self._readings: deque[tuple[float, int]] = deque()

    def per_second(self, count: int) -> float:
        now = time.monotonic()
        self._readings.append((now, count))
        while len(self._readings) > 2 and now - self._readings[1][0] >= self.window:
            self._readings.popleft()
        start, first = self._readings[0]
        return (count - first) / (now - start) if now - start > 0 else 0.0


def _reading(sequence: Sequence | None) -> bool:
    """Whether `sequence` is still waiting for a slot or reading its prompt."""
    if sequence is None or sequence.finish is not None:
        return False
    return sequence.generated == 0 and sequence.pending is None


def _placeholders(prompt: list[int]) -> int:
    """How many positions at the start of `prompt` are media placeholders (negative ids)."""
    count = 0
    for token in prompt:
        if token >= 0:
            break
        count += 1
    return count


def _common_prefix(cached: list[int], prompt: list[int]) -> int:
    size = min(len(cached), len(prompt))
    if not size:
        return 0
    differs = np.flatnonzero(np.asarray(cached[:size]) != np.asarray(prompt[:size]))
    return int(differs[0]) if len(differs) else size


def _logprobs(row: np.ndarray, token: int, top: int) -> TokenLogprob:
    """`token`'s log probability under the raw logits `row`, and the `top` most likely tokens."""
    peak = float(row.max())
    norm = peak + math.log(float(np.exp(row - peak).sum()))
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        best = np.argpartition(-row, top)[:top] if top < len(row) else np.arange(len(row))
        best = best[np.argsort(-row[best], kind="stable")]
        alternatives = [(int(t), float(row[t]) - norm) for t in best]
    return TokenLogprob(float(row[token]) - norm, alternatives)
