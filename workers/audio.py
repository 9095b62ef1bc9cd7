"""Audio in and out of the audio jobs, with PyAV (FFmpeg's libraries, no ffmpeg binary).

`decode` turns an uploaded file into the mono float samples Whisper reads. `StreamEncoder`
turns speech, fed as it is synthesized, into one file of an OpenAI speech `response_format`,
handing back the encoded bytes as soon as the muxer has written them: the pieces it returns,
concatenated, are that one file. Its output is never seeked back into (the container is written
as a stream), so each piece can be sent the moment it exists; the price is that the formats
whose header carries the length (wav, flac) say "unknown length" there, as OpenAI's streamed
wav does.

Imported only by the job handlers, never by the API: it loads PyAV and NumPy at import time.
"""

from __future__ import annotations

import struct

import av
import numpy as np

#: Every speech format is produced at OpenAI's rate: 24 kHz, mono, 16-bit where it applies.
SAMPLE_RATE = 24000

#: response_format -> (FFmpeg container, FFmpeg encoder); wav and pcm are written directly.
_CODECS = {
    "mp3": ("mp3", "libmp3lame"),
    "opus": ("ogg", "libopus"),
    "aac": ("adts", "aac"),
    "flac": ("flac", "flac"),
}
FORMATS = (*_CODECS, "wav", "pcm")

#: Size of a stream's RIFF and data chunks when the length is not known yet (OpenAI's value).
_STREAMING_SIZE = 0xFFFFFFFF


class AudioDecodeError(ValueError):
    """The bytes are not audio PyAV can read, or hold no audio samples."""


def decode(data: bytes, rate: int = 16000) -> np.ndarray:
    """The first audio stream of `data` (any container and codec FFmpeg reads) as mono
    float32 samples in [-1, 1] at `rate` Hz.

    Raises AudioDecodeError for empty input, unreadable data, a file without an audio stream
    and one whose audio stream decodes to nothing.
    """
    if not data:
        raise AudioDecodeError("the file is empty")
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    pieces: list[np.ndarray] = []
    try:
        with av.open(_Reader(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioDecodeError("the file has no audio stream")
            stream = container.streams.audio[0]
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError:
                    continue  # a damaged packet: skip it, as FFmpeg's own tools do
                for frame in frames:
                    pieces.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            pieces.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except AudioDecodeError:
        raise
    except (av.error.FFmpegError, ValueError, IndexError, EOFError) as exc:
        raise AudioDecodeError(f"it cannot be decoded as audio ({_describe(exc)})") from None
    samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)
    if samples.size == 0:
        raise AudioDecodeError("it contains no audio samples")
    return samples.astype(np.float32) / 32768.0


def _describe(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return " ".join(text.split()) or type(exc).__name__


class _Reader:
    """Bytes as a read-only, seekable file object (PyAV reads through it without copying)."""

    def __init__(self, data: bytes):
        self._view = memoryview(data)
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._pos + size)
        chunk = self._view[self._pos:end].tobytes()
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._view)}[whence]
        self._pos = max(0, min(len(self._view), base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False


class _Sink:
    """A write-only file object: with no `seek`, PyAV writes the container as a stream."""

    def __init__(self):
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def wav_header(rate: int = SAMPLE_RATE, channels: int = 1, bits: int = 16) -> bytes:
    """A 44-byte PCM WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    block = channels * bits // 8
    return (
        b"RIFF" + struct.pack("<I", _STREAMING_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, bits)
        + b"data" + struct.pack("<I", _STREAMING_SIZE)
    )


class StreamEncoder:
    """Encodes 16-bit mono speech, fed piece by piece, into one file of `fmt`.

    `write(samples)` returns the bytes of the file that are ready now (possibly none: encoders
    and muxers hold back a little); `close()` returns the rest. Input at `input_rate` is
    resampled to SAMPLE_RATE. Formats: mp3 (MPEG layer 3), opus (Opus in Ogg), aac (AAC in
    ADTS), flac, wav (PCM WAV, streaming header), pcm (raw signed 16-bit little-endian).
    """

    def __init__(self, fmt: str, input_rate: int):
        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}")
        self.format = fmt
        self.input_rate = input_rate
        self.samples_out = 0  # samples at SAMPLE_RATE handed to the encoder so far
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        self._header_pending = fmt == "wav"
        self._closed = False
        self._container = self._stream = None
        self._sink = _Sink()
        if fmt in _CODECS:
            container_format, codec = _CODECS[fmt]
            # flush_packets: every packet reaches the sink as soon as it is muxed.
            self._container = av.open(self._sink, mode="w", format=container_format,
                                      options={"flush_packets": "1"})
            self._stream = self._container.add_stream(codec, rate=SAMPLE_RATE, layout="mono")

    def write(self, samples: np.ndarray) -> bytes:
        """Encode `samples` (int16, mono, at input_rate); the file bytes ready now."""
        samples = np.ascontiguousarray(samples, dtype=np.int16).reshape(1, -1)
        if samples.size == 0:
            return b""
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.input_rate
        return self._encode(self._resampler.resample(frame))

    def close(self) -> bytes:
        """Flush the encoder and finish the file; the last bytes."""
        if self._closed:
            return b""
        out = self._encode(self._resampler.resample(None))
        self._closed = True
        if self._container is not None:
            self._container.mux(self._stream.encode(None))
            self._container.close()
        return out + self._take()

    def _encode(self, frames: list) -> bytes:
        for frame in frames:
            if self._stream is None:
                self._sink.write(frame.to_ndarray().reshape(-1).astype("<i2").tobytes())
            else:
                frame.pts = self.samples_out
                self._container.mux(self._stream.encode(frame))
            self.samples_out += frame.samples
        return self._take()

    def _take(self) -> bytes:
        out = self._sink.drain()
        if self._header_pending:
            self._header_pending = False
            out = wav_header() + out
        return out
