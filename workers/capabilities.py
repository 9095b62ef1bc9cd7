"""What each backend can honour, checked before a job is queued and again when it runs.

Pure and light: the API imports this module, so it must never pull in a model library.

The rule: every OpenAI parameter a backend implements is honoured; a parameter that would
change the output and that the backend cannot honour is reported (the API answers 400 naming
it), never silently ignored. Parameters that only describe the request (`user`, `metadata`,
`service_tier`, `stream`, ...) are accepted. Anything not listed here for a kind is reported
too, so a field the upstream spec adds later is refused until someone implements it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from workers import audio_jobs, image_jobs
from workers.config import ModelConfig
from workers.defaults import EXTENSIONS, SCHEDULING_EXTENSIONS
from workers.tools.request import ToolRequestError, tool_request

#: Backend names accepted in model configs, mapped to the backend module that runs them.
BACKEND_NAMES = {
    "llama-cpp": "llama-cpp",
    "llama.cpp": "llama-cpp",
    "llama": "llama-cpp",
    "sentence-transformers": "sentence-transformers",
    "sentencetransformers": "sentence-transformers",
    "sentence_transformers": "sentence-transformers",
    "diffusers": "diffusers",
    "whisper": "faster-whisper",
    "faster-whisper": "faster-whisper",
    "faster_whisper": "faster-whisper",
    "piper": "piper",
}

#: Job kinds of the media backends; their parameter checks live beside their job handlers.
IMAGE_KINDS = frozenset({"image", "image_edit"})
AUDIO_KINDS = frozenset({"speech", "transcription", "translation"})
_MEDIA_KINDS = {"diffusers": IMAGE_KINDS, "faster-whisper": frozenset({"transcription", "translation"}),
                "piper": frozenset({"speech"})}

KINDS = ("chat", "completion", "embedding", "tokenize", "detokenize")

_KIND_LABELS = {
    "chat": "chat completions",
    "completion": "text completions",
    "embedding": "embeddings",
    "tokenize": "tokenization",
    "detokenize": "detokenization",
    "image": "image generation",
    "image_edit": "image edits",
    "speech": "speech",
    "transcription": "transcriptions",
    "translation": "translations",
}

MAX_TOOLS = 128  # tools one request may offer (OpenAI's limit): each becomes part of the answer's grammar
MAX_SCHEMA_BYTES = 256 * 1024  # JSON of a request's tools, or of its response schema: the grammar grows with it
MAX_IMAGES = 8  # images one chat request may carry: each is decoded to RGB and encoded on the worker
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

# LocalAI's known_usecases names for the kinds that a config may switch off.
_USECASES = {"chat": "chat", "completion": "completion", "embedding": "embeddings"}


#: Text generation knobs the llama-cpp backend honours. `n_keep` only matters when the context
#: would overflow and older tokens are dropped; this backend never drops tokens (a prompt that
#: does not fit is refused and generation stops at the end of the context), so every prompt
#: token is always kept and any n_keep is satisfied. `tfs_z` is handled separately: llama.cpp
#: removed tail-free sampling, so only its "off" value (1) can be honoured.
LLAMA_TEXT_EXTENSIONS = SCHEDULING_EXTENSIONS | {
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "grammar",
    "ignore_eos",
    "n_keep",
    "tfs_z",
}

# Parameters that only describe or route the request; accepted by every kind that has them.
_METADATA = {
    "model",
    "user",
    "metadata",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "prompt_cache_options",
    "stream",
    "stream_options",
    "parallel_tool_calls",
    EXTENSIONS,
}

_CHAT_HONOURED = _METADATA | {
    "messages",
    "temperature",
    "top_p",
    "n",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "seed",
    "response_format",
    # passed to the chat template (`enable_thinking`, `reasoning_effort`); templates that read
    # neither ignore it (workers.execute._template_options)
    "reasoning_effort",
}

_COMPLETION_HONOURED = _METADATA | {
    "prompt",
    "temperature",
    "top_p",
    "n",
    "stop",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "seed",
}

_EMBEDDING_HONOURED = _METADATA | {"input"}
_TOKENIZE_HONOURED = {"model", "content", "add_special"}
_DETOKENIZE_HONOURED = {"model", "tokens"}

UNSUPPORTED = "unsupported_parameter"
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
INVALID_VALUE = "invalid_value"


class Problem(tuple):
    """`(param, message)` for a part of a request a model cannot honour, plus the OpenAI error
    `code` to answer with. A plain 2-tuple to unpack, so `param, message = problem` still works."""

    code: str

    def __new__(cls, param: str, message: str, code: str = UNSUPPORTED):
        problem = super().__new__(cls, (param, message))
        problem.code = code
        return problem


def too_long(param: str, limit: int, tokens: int, *, at_least: bool = False) -> Problem:
    """OpenAI's 400 for a prompt that does not fit the context; `at_least` when `tokens` is a
    lower bound (counting stopped early, or only the messages were counted)."""
    count = f"at least {tokens}" if at_least else str(tokens)
    return Problem(
        param,
        f"This model's maximum context length is {limit} tokens. However, your {param} resulted in "
        f"{count} tokens. Please reduce the length of the {param}.",
        CONTEXT_LENGTH_EXCEEDED,
    )


def backend_name(config: ModelConfig) -> str | None:
    """The canonical backend for `config` ("llama-cpp" or "sentence-transformers"), or None.

    Without a `backend` field, a `.gguf` model file means llama-cpp.
    """
    if config.backend is not None:
        return BACKEND_NAMES.get(config.backend.lower())
    ref = config.model_ref or ""
    if ref.lower().endswith(".gguf"):
        return "llama-cpp"
    return None


def supported_kinds(config: ModelConfig) -> frozenset[str]:
    """The job kinds this model can run.

    llama-cpp: chat, completion, tokenize, detokenize, plus embedding when the config sets
    `embeddings: true` (as LocalAI does). sentence-transformers: embedding, tokenize,
    detokenize. A non-empty `known_usecases` further limits chat/completion/embeddings to the
    ones it lists (`embeddings: true` also counts as listing embeddings).
    """
    backend = backend_name(config)
    if backend == "llama-cpp":
        kinds = {"chat", "completion", "tokenize", "detokenize"}
        if config.embeddings:
            kinds.add("embedding")
    elif backend == "sentence-transformers":
        kinds = {"embedding", "tokenize", "detokenize"}
    elif backend in _MEDIA_KINDS:
        return _MEDIA_KINDS[backend]
    else:
        return frozenset()
    if config.known_usecases:
        for kind, usecase in _USECASES.items():
            listed = usecase in config.known_usecases or (kind == "embedding" and config.embeddings)
            if not listed:
                kinds.discard(kind)
    return frozenset(kinds)


def unsupported(kind: str, config: ModelConfig, request: dict) -> Problem | None:
    """The `Problem` (`(param, message)`, `.code`) with the first part of `request` that
    `config`'s backend cannot honour, or None when the whole request can be honoured.

    `param` is OpenAI's path to the field (`tools`, `messages[2].content[0]`,
    `x-localai-extensions.mirostat`); "model" when the model cannot run `kind` at all. The code
    is "unsupported_parameter", or "context_length_exceeded" for a prompt that cannot fit the
    context whatever the tokenizer makes of it (more messages than the context has tokens).
    """
    problem = _first_problem(kind, config, request)
    if problem is None or isinstance(problem, Problem):
        return problem
    return Problem(*problem)


def _first_problem(kind: str, config: ModelConfig, request: dict) -> tuple[str, str] | None:
    label = _model_label(config, request)
    backend = backend_name(config)
    if kind not in supported_kinds(config):
        if backend is None:
            why = f"its backend {config.backend!r} is not one localq workers can run"
            return "model", f"The model {label} cannot be used: {why}."
        return "model", f"The model {label} does not support {_KIND_LABELS.get(kind, kind)}."
    if kind in IMAGE_KINDS:
        return image_jobs.unsupported(kind, config, request)
    if kind in AUDIO_KINDS:
        return audio_jobs.unsupported(kind, config, request)
    checks = _CHECKS[kind]
    honoured = checks["honoured"]
    special: Mapping[str, Callable] = checks["special"]
    for key, value in request.items():
        if key in special:
            problem = special[key](request, value, config, label)
        elif key in honoured or value is None:
            problem = None
        else:
            problem = (key, f"The model {label} does not support the '{key}' parameter.")
        if problem is not None:
            return problem
    return None


# ---------------------------------------------------------------------------------------------
# Per-parameter checks: (request, value, config, label) -> Problem | None
# ---------------------------------------------------------------------------------------------


def _model_label(config: ModelConfig, request: Mapping) -> str:
    sent = request.get("model")
    return f"'{sent}'" if isinstance(sent, str) and sent else f"'{config.name}'"


def _reject(param: str, label: str, why: str) -> Problem:
    return param, f"The model {label} cannot honour '{param}': {why}."


def _extensions(allowed: frozenset[str] | set[str]):
    def check(request, value, config, label) -> Problem | None:
        if not isinstance(value, Mapping):
            return None
        for name, knob in value.items():
            param = f"{EXTENSIONS}.{name}"
            if knob is None:
                continue
            if name not in allowed:
                return _reject(param, label, f"the {backend_name(config)} backend has no such control")
            if name == "tfs_z" and knob != 1:
                return _reject(
                    param, label, "tail-free sampling was removed from llama.cpp; only 1 (off) is accepted"
                )
            if name == "grammar" and _constrained_format(request.get("response_format")):
                return _reject(
                    param, label, "a grammar cannot be combined with a JSON response_format"
                )
        return None

    return check


def _constrained_format(response_format: Any) -> bool:
    return isinstance(response_format, Mapping) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )


def _response_format(request, value, config, label) -> Problem | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind not in ("text", "json_object", "json_schema"):
        return _reject("response_format", label, f"response format type {kind!r} is not supported")
    if kind == "json_schema" and _too_large(value):
        return Problem("response_format.json_schema.schema",
                       f"Invalid schema: it takes more than {MAX_SCHEMA_BYTES} bytes of JSON.", INVALID_VALUE)
    return None


def _too_large(value: Any) -> bool:
    return len(json.dumps(value, separators=(",", ":"))) > MAX_SCHEMA_BYTES


def _messages(request, value, config, label) -> Problem | None:
    # Every chat template spends at least one token per message: more messages than the
    # context has tokens cannot fit, and are refused before anything renders or tokenizes them.
    if isinstance(value, list) and len(value) >= config.context_tokens:
        return too_long("messages", config.context_tokens, len(value), at_least=True)
    images = 0
    for index, message in enumerate(value or ()):
        if not isinstance(message, Mapping):
            continue
        if message.get("audio"):
            return _reject(f"messages[{index}].audio", label, "it cannot produce audio")
        for call_index, call in enumerate(message.get("tool_calls") or ()):
            if isinstance(call, Mapping) and call.get("type", "function") != "function":
                return _reject(f"messages[{index}].tool_calls[{call_index}].type", label,
                               "only function tool calls can be carried in a conversation")
        content = message.get("content")
        if isinstance(content, list):
            for part_index, part in enumerate(content):
                part_type = part.get("type") if isinstance(part, Mapping) else None
                if part_type == "image_url" and config.mmproj_ref is not None and message.get("role") == "user":
                    images += 1  # a vision projector reads it (workers/backends/llama_vision.py)
                    if images > MAX_IMAGES:
                        return Problem(f"messages[{index}].content[{part_index}]",
                                       f"A request may carry at most {MAX_IMAGES} images.", INVALID_VALUE)
                    continue
                if part_type not in ("text", "refusal"):
                    reads = "text and images" if config.mmproj_ref is not None else "text"
                    return _reject(
                        f"messages[{index}].content[{part_index}]",
                        label,
                        f"it only reads {reads}, not '{part_type}' content parts",
                    )
    return None


def _tools(request, value, config, label) -> Problem | None:
    """`tools` and `functions` with their choices: what `workers.tools.request` cannot make sense
    of, and a JSON response format beside active tools (the constrained answer is one or the other)."""
    try:
        tools = tool_request(request)
    except ToolRequestError as err:
        return Problem(err.param, f"Invalid value for '{err.param}': {err}.", INVALID_VALUE)
    if tools is None:
        return None
    for key in ("tools", "functions"):
        listed = request.get(key)
        if isinstance(listed, list) and len(listed) > MAX_TOOLS:
            return Problem(key, f"Invalid '{key}': array too long. Expected an array with maximum length {MAX_TOOLS}, "
                           f"but got an array with length {len(listed)} instead.", "array_above_max_length")
        if listed and _too_large(listed):
            return Problem(key, f"Invalid '{key}': the definitions take more than {MAX_SCHEMA_BYTES} bytes of JSON.",
                           INVALID_VALUE)
    if request.get("tools") and request.get("functions"):
        return Problem("functions", "Send either 'tools' or the deprecated 'functions', not both.", INVALID_VALUE)
    for index, function in enumerate(tools.functions):
        if not _FUNCTION_NAME.fullmatch(function.name):
            param = f"tools[{index}].function.name" if not tools.legacy else f"functions[{index}].name"
            return Problem(param, f"Invalid function name {function.name!r}: names are 1 to 64 letters, digits, "
                           "underscores and dashes.", INVALID_VALUE)
    if tools.active and (request.get(EXTENSIONS) or {}).get("grammar") is not None:
        return _reject(f"{EXTENSIONS}.grammar", label, "a grammar cannot be combined with tools the model may call")
    if tools.active and _constrained_format(request.get("response_format")):
        return _reject("response_format", label, "a JSON response format cannot be combined with tools the model "
                       "may call; send tool_choice 'none' or no response_format")
    return None


def _tool_choice(request, value, config, label) -> Problem | None:
    if value is not None and not request.get("tools") and value not in ("none", "auto"):
        return Problem("tool_choice", "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                       "are specified.", INVALID_VALUE)
    return None


def _function_call(request, value, config, label) -> Problem | None:
    if value is not None and not request.get("functions") and value not in ("none", "auto"):
        return Problem("function_call", "Invalid value for 'function_call': 'function_call' is only allowed when "
                       "'functions' are specified.", INVALID_VALUE)
    return None


def _modalities(request, value, config, label) -> Problem | None:
    if value and any(modality != "text" for modality in value):
        return _reject("modalities", label, "it only produces text")
    return None


def _not_null(param: str, why: str):
    def check(request, value, config, label) -> Problem | None:
        return None if value is None else _reject(param, label, why)

    return check


def _verbosity(request, value, config, label) -> Problem | None:
    if value is None or value == "medium":
        return None
    return _reject("verbosity", label, "its answers' length cannot be steered by verbosity")


def _store(request, value, config, label) -> Problem | None:
    if not value:
        return None
    return _reject("store", label, "localq does not store completions for later retrieval")


def _suffix(request, value, config, label) -> Problem | None:
    if not value:
        return None
    return _reject("suffix", label, "it cannot insert text before a suffix")


def _best_of(request, value, config, label) -> Problem | None:
    n = request.get("n") or 1
    if value is None or value == n:
        return None
    return _reject("best_of", label, "ranking extra candidates is not supported; send best_of equal to n")


def _echo(request, value, config, label) -> Problem | None:
    if value and request.get("logprobs") is not None:
        return _reject("logprobs", label, "log probabilities of echoed prompt tokens are not available")
    return None


def _encoding_format(request, value, config, label) -> Problem | None:
    if value is None or value in ("float", "base64"):
        return None
    return _reject("encoding_format", label, "only 'float' and 'base64' encodings are produced")


def _dimensions(request, value, config, label) -> Problem | None:
    limit = config.embedding_dimensions
    if value is None or limit is None or value <= limit:
        return None
    return _reject("dimensions", label, f"its embeddings have {limit} dimensions")


def _completion_prompt(request, value, config, label) -> Problem | None:
    """Prompts sent as token ids are counted exactly; text needs the tokenizer (the worker's)."""
    if not isinstance(value, list) or not value:
        return None
    prompts = [value] if all(isinstance(item, int) for item in value) else value
    for position, prompt in enumerate(prompts):
        if isinstance(prompt, list) and len(prompt) >= config.context_tokens:
            return too_long("prompt" if position == 0 else f"prompt[{position}]", config.context_tokens, len(prompt))
    return None


def _embedding_input(request, value, config, label) -> Problem | None:
    if backend_name(config) != "llama-cpp":
        return None
    if isinstance(value, list) and value and not isinstance(value[0], str):
        return _reject("input", label, "token arrays cannot be embedded by the llama-cpp backend; send text")
    return None


_TEXT_SPECIAL = {
    EXTENSIONS: _extensions(LLAMA_TEXT_EXTENSIONS),
}

_CHECKS: dict[str, dict[str, Any]] = {
    "chat": {
        "honoured": _CHAT_HONOURED,
        "special": {
            **_TEXT_SPECIAL,
            "messages": _messages,
            "response_format": _response_format,
            "tools": _tools,
            "tool_choice": _tool_choice,
            "functions": _tools,
            "function_call": _function_call,
            "modalities": _modalities,
            "audio": _not_null("audio", "it cannot produce audio"),
            "prediction": _not_null("prediction", "predicted outputs are not supported"),
            "web_search_options": _not_null("web_search_options", "it cannot search the web"),
            "moderation": _not_null("moderation", "localq does not moderate outputs"),
            "verbosity": _verbosity,
            "store": _store,
        },
    },
    "completion": {
        "honoured": _COMPLETION_HONOURED,
        "special": {
            **_TEXT_SPECIAL,
            "prompt": _completion_prompt,
            "suffix": _suffix,
            "best_of": _best_of,
            "echo": _echo,
        },
    },
    "embedding": {
        "honoured": _EMBEDDING_HONOURED,
        "special": {
            EXTENSIONS: _extensions(SCHEDULING_EXTENSIONS),
            "encoding_format": _encoding_format,
            "dimensions": _dimensions,
            "input": _embedding_input,
        },
    },
    "tokenize": {"honoured": _TOKENIZE_HONOURED, "special": {}},
    "detokenize": {"honoured": _DETOKENIZE_HONOURED, "special": {}},
}
