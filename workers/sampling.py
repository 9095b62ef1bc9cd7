"""Where each generation setting comes from: the one place that decides precedence.

For every setting the first value found wins, in this order:

1. the request's own OpenAI field (`temperature`, `max_completion_tokens`, ...);
2. `request["x-localai-extensions"]` (`top_k`, `mirostat`, ...; the API has already moved
   LocalAI-style top-level names there);
3. the model config's `parameters` (LocalAI's names);
4. the backend's default (llama-cpp-python's defaults for that call; for completions
   `max_tokens` defaults to 16 as OpenAI's does, for chat it runs to the end of the context).

A null in the request counts as not sent. Pure: no model library is imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workers.config import ModelConfig

EXTENSIONS = "x-localai-extensions"

# llama-cpp-python's defaults: create_chat_completion's for chat, create_completion's for
# completions (they differ only in temperature and max_tokens).
_DEFAULTS: dict[str, Any] = {
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 1.0,
    "repeat_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "repeat_last_n": 64,  # Llama(last_n_tokens_size=64)
    "mirostat_mode": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "tfs_z": 1.0,
    "seed": None,
    "grammar": None,
    "ignore_eos": False,
    "n_keep": None,
    "logit_bias": None,
}
_KIND_DEFAULTS = {
    "chat": {"temperature": 0.2, "max_tokens": None},
    "completion": {"temperature": 0.8, "max_tokens": 16},
}

# setting -> the names it goes by, most specific first; each source is searched for all of
# them before the next source is tried (so max_completion_tokens beats max_tokens).
_NAMES: dict[str, tuple[str, ...]] = {
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "top_k": ("top_k",),
    "min_p": ("min_p",),
    "typical_p": ("typical_p",),
    "repeat_penalty": ("repeat_penalty",),
    "presence_penalty": ("presence_penalty",),
    "frequency_penalty": ("frequency_penalty",),
    "repeat_last_n": ("repeat_last_n",),
    "mirostat_mode": ("mirostat", "mirostat_mode"),
    "mirostat_tau": ("mirostat_tau",),
    "mirostat_eta": ("mirostat_eta",),
    "tfs_z": ("tfs_z",),
    "seed": ("seed",),
    "grammar": ("grammar",),
    "ignore_eos": ("ignore_eos",),
    "n_keep": ("n_keep",),
    "logit_bias": ("logit_bias",),
}
_MAX_TOKENS_NAMES = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_tokens",),
}


def resolve(kind: str, request: dict, config: ModelConfig) -> dict:
    """Keyword arguments for a llama-cpp-python style generation call.

    Keys: temperature, top_p, top_k, min_p, typical_p, repeat_penalty, presence_penalty,
    frequency_penalty, repeat_last_n, max_tokens (None = until the context is full), stop
    (list: request's stop, then the config's stopwords, without repeats), seed,
    logit_bias ({int token id: float} or None), mirostat_mode, mirostat_tau, mirostat_eta,
    tfs_z, grammar (GBNF text or None; the backend builds the grammar object), ignore_eos,
    n_keep, logprobs and top_logprobs, response_format (chat only, else None).

    `logprobs` follows the llama-cpp-python call it feeds: for chat a bool with
    `top_logprobs` an int (0 when not sent); for completions the int (or None) the client
    sent, with `top_logprobs` the same number.
    """
    if kind not in _KIND_DEFAULTS:
        raise ValueError(f"no generation settings for job kind {kind!r}")
    sources = (
        request,
        request.get(EXTENSIONS) or {},
        config.parameters or {},
    )
    defaults = {**_DEFAULTS, **_KIND_DEFAULTS[kind]}
    resolved: dict[str, Any] = {}
    for setting, names in _NAMES.items():
        resolved[setting] = _first(sources, names, defaults[setting])
    resolved["max_tokens"] = _first(sources, _MAX_TOKENS_NAMES[kind], defaults["max_tokens"])
    resolved["stop"] = _stops(request.get("stop"), config.stopwords)
    if resolved["logit_bias"] is not None:
        resolved["logit_bias"] = {int(token): float(bias) for token, bias in resolved["logit_bias"].items()}
    if kind == "chat":
        resolved["logprobs"] = bool(request.get("logprobs"))
        resolved["top_logprobs"] = (request.get("top_logprobs") or 0) if resolved["logprobs"] else None
        resolved["response_format"] = request.get("response_format")
    else:
        resolved["logprobs"] = request.get("logprobs")
        resolved["top_logprobs"] = request.get("logprobs")
        resolved["response_format"] = None
    return resolved


def _first(sources: tuple[Mapping, ...], names: tuple[str, ...], default: Any) -> Any:
    for source in sources:
        for name in names:
            value = source.get(name)
            if value is not None:
                return value
    return default


def _stops(stop: Any, stopwords: tuple[str, ...]) -> list[str]:
    if stop is None:
        requested: list[str] = []
    elif isinstance(stop, str):
        requested = [stop]
    else:
        requested = list(stop)
    out: list[str] = []
    for word in (*requested, *stopwords):
        if word and word not in out:
            out.append(word)
    return out
