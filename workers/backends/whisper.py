"""faster-whisper backend (CTranslate2): transcription and translation of speech.

`parameters.model` is a CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json,
vocabulary.txt), as faster-whisper's converter writes it; nothing is ever downloaded.
`parameters.compute_type` picks CTranslate2's weight type (default int8 on cpu, float16 on
gpu). Segments are decoded lazily: the job handler reads them one at a time, so it can send
each as soon as it exists and stop between two of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.transcribe import Segment, TranscriptionInfo
from faster_whisper.vad import VadOptions

from workers import devices
from workers.config import ModelConfig

#: Whisper's input rate; `transcribe` takes samples at this rate.
SAMPLE_RATE = 16000


class WhisperBackend:
    """One loaded Whisper model."""

    sample_rate = SAMPLE_RATE

    def __init__(self, config: ModelConfig):
        path = config.locate_model()
        cuda = devices.uses_gpu(config)  # not on a simulated GPU worker
        compute_type = config.parameters.get("compute_type") or ("float16" if cuda else "int8")
        self.config = config
        self.model = WhisperModel(
            str(path),
            device="cuda" if cuda else "cpu",
            compute_type=str(compute_type),
            cpu_threads=config.threads or 0,
            local_files_only=True,
        )

    @property
    def multilingual(self) -> bool:
        """False for the English-only (.en) models."""
        return bool(self.model.model.is_multilingual)

    def close(self) -> None:
        self.model = None  # CTranslate2 frees the weights with the last reference

    def detect_language(self, audio: np.ndarray, among: list[str]) -> str:
        """The likeliest of the languages `among` (codes) for the start of `audio`."""
        _, _, probabilities = self.model.detect_language(audio)
        scores = dict(probabilities)
        return max(among, key=lambda code: scores.get(code, 0.0))

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        task: str,
        language: str | None,
        options: dict[str, Any],
        vad: dict[str, Any] | None,
    ) -> tuple[Iterator[Segment], TranscriptionInfo]:
        """Start decoding `audio` (mono float32 at SAMPLE_RATE): (lazy segments, info).

        `task` is "transcribe" or "translate" (to English); `language` None detects it (an
        English-only model always reads English). `options` are faster-whisper `transcribe`
        keyword arguments; `vad` the Silero VAD options when stretches without speech are to
        be cut out first (None: keep all the audio). CTranslate2 serialises concurrent calls
        itself, so no lock is needed here.
        """
        kwargs = dict(options)
        if vad is not None:
            kwargs["vad_filter"] = True
            kwargs["vad_parameters"] = VadOptions(**vad)
        else:
            kwargs["vad_filter"] = False
        segments, info = self.model.transcribe(audio, task=task, language=language, **kwargs)
        return iter(segments), info
