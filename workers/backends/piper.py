"""piper backend (piper-tts on onnxruntime): text to speech, one sentence at a time.

`parameters.model` is a piper voice (`.onnx`, with its `.onnx.json` beside it), loaded with the
model; the other voices a config's `voices` table names are loaded the first time a request
asks for them and kept with the model. piper is GPL-3.0 and ships in localq's optional
`audio` extra; this module is only imported when a piper model is loaded.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from piper import PiperVoice, SynthesisConfig

from workers import devices
from workers.config import ModelConfig, ModelConfigError


@dataclass
class Sentence:
    """The speech of one sentence."""

    samples: np.ndarray  # int16, mono, at the voice's sample rate
    phoneme_ids: int  # how many phoneme ids the voice model read for it


@dataclass(frozen=True)
class Settings:
    """How to speak: None leaves the voice's own default."""

    speaker_id: int | None = None
    length_scale: float | None = None
    noise_scale: float | None = None
    noise_w: float | None = None
    sentence_silence: float = 0.0  # seconds of silence between two sentences
    speed: float = 1.0  # OpenAI's speed: divides the length scale


class PiperBackend:
    """A piper voice model, plus the other voices its config names, loaded on first use."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.default_path = config.locate_model()
        self._voices: dict[Path, PiperVoice] = {}
        self._lock = threading.Lock()
        self.voice(self.default_path)

    def close(self) -> None:
        with self._lock:
            self._voices.clear()

    def voice(self, path: Path | None = None) -> PiperVoice:
        """The loaded voice at `path` (default: the config's model), loading it when needed."""
        path = Path(path or self.default_path)
        with self._lock:
            voice = self._voices.get(path)
            if voice is None:
                if not path.is_file():
                    raise ModelConfigError(f"{self.config.source}: voices: {path} does not exist")
                voice = PiperVoice.load(str(path), use_cuda=devices.uses_gpu(self.config))
                self._voices[path] = voice
            return voice

    def sample_rate(self, path: Path | None = None) -> int:
        return int(self.voice(path).config.sample_rate)

    def speakers(self, path: Path | None = None) -> int:
        """How many speakers the voice model holds (1 for a single-speaker voice)."""
        return max(1, int(self.voice(path).config.num_speakers))

    def synthesize(self, text: str, settings: Settings, path: Path | None = None) -> Iterator[Sentence]:
        """Speak `text`, one Sentence per sentence, each synthesized when it is asked for.

        Every sentence after the first starts with `sentence_silence` seconds of silence.
        """
        voice = self.voice(path)
        base = settings.length_scale if settings.length_scale is not None else voice.config.length_scale
        syn = SynthesisConfig(
            speaker_id=settings.speaker_id,
            length_scale=base / settings.speed,
            noise_scale=settings.noise_scale,
            noise_w_scale=settings.noise_w,
        )
        gap = np.zeros(int(round(settings.sentence_silence * voice.config.sample_rate)), dtype=np.int16)
        for index, chunk in enumerate(voice.synthesize(text, syn_config=syn)):
            samples = chunk.audio_int16_array
            if index and gap.size:
                samples = np.concatenate([gap, samples])
            yield Sentence(samples, len(chunk.phoneme_ids))
