"""Images in a chat prompt for a llama-cpp model with a vision projector (`mmproj` in its config).

llama.cpp's multimodal library (`mtmd`, through llama-cpp-python's bindings) splits a rendered
prompt at its media markers into text and image chunks, and encodes an image chunk into
embeddings the model reads. The prompt handed to the batching engine is then a `MediaPrompt`:
everything up to the last image is its prelude, read into the sequence's own KV stream by
`mtmd_helper_eval_chunk_single` on the engine's thread when the sequence gets its slot (one
placeholder per position, negative ids no other prompt shares, so no other prompt reuses that
cache); the text after it is read in chunks like any prompt.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
import weakref
from pathlib import Path

import llama_cpp
from llama_cpp import mtmd_cpp

from workers.image_inputs import DecodedImage

_placeholder_ids = itertools.count(1)
_placeholder_lock = threading.Lock()


class MediaPrompt(list):
    """Prompt positions (placeholders for the prelude, then text tokens) and `prelude(ctx, seq_id)`."""

    prelude = None


class Vision:
    """One model's projector. `mtmd_tokenize` runs under the backend's lock; encoding runs on the
    engine's thread (the prelude), one image at a time."""

    def __init__(self, projector: Path, model: llama_cpp.llama_model_p, *, threads: int, gpu: bool):
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = gpu
        params.n_threads = threads
        self.marker = mtmd_cpp.mtmd_default_marker().decode()
        self._ctx = mtmd_cpp.mtmd_init_from_file(str(projector).encode(), model, params)
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not load the vision projector {projector}")
        if not mtmd_cpp.mtmd_support_vision(self._ctx):
            mtmd_cpp.mtmd_free(self._ctx)
            raise RuntimeError(f"{projector} is not a vision projector")

    def close(self) -> None:
        if self._ctx:
            mtmd_cpp.mtmd_free(self._ctx)
            self._ctx = None

    def prompt(self, text: str, images: list[DecodedImage], n_batch: int) -> MediaPrompt:
        """`text` (holding one marker per image, in order) with `images`, as the engine reads it.
        ValueError when it cannot be tokenized."""
        bitmaps = []
        try:
            for image in images:
                pixels = (ctypes.c_uint8 * len(image.rgb)).from_buffer_copy(image.rgb)
                bitmap = mtmd_cpp.mtmd_bitmap_init(image.width, image.height, pixels)
                if not bitmap:
                    raise ValueError("llama.cpp could not take the image")
                bitmaps.append(bitmap)
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            encoded = text.encode("utf-8")
            source = mtmd_cpp.mtmd_input_text()
            source.text, source.text_len, source.add_special, source.parse_special = encoded, len(encoded), False, True
            array = (mtmd_cpp.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            status = mtmd_cpp.mtmd_tokenize(self._ctx, chunks, ctypes.byref(source), array, len(bitmaps))
        finally:
            for bitmap in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bitmap)
        if status != 0:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise ValueError(f"the prompt's images do not match its markers (llama.cpp status {status})")
        return self._split(chunks, n_batch)

    def _split(self, chunks, n_batch: int) -> MediaPrompt:
        count = mtmd_cpp.mtmd_input_chunks_size(chunks)
        last = mtmd_cpp.mtmd_input_chunks_get(chunks, count - 1) if count else None
        if last is None or mtmd_cpp.mtmd_input_chunk_get_type(last) != mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
            raise ValueError("the prompt must end with text after its last image")
        positions = sum(mtmd_cpp.mtmd_input_chunk_get_n_pos(mtmd_cpp.mtmd_input_chunks_get(chunks, i))
                        for i in range(count - 1))
        size = ctypes.c_size_t(0)
        tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(last, ctypes.byref(size))
        with _placeholder_lock:
            first = next(_placeholder_ids)
            for _ in range(positions - 1):
                next(_placeholder_ids)
        prompt = MediaPrompt([-(first + i) for i in range(positions)] + [tokens[i] for i in range(size.value)])
        vision = self

        def prelude(ctx, seq_id: int) -> int:
            n_past = 0
            for index in range(count - 1):
                chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, index)
                reached = llama_cpp.llama_pos(0)
                status = mtmd_cpp.mtmd_helper_eval_chunk_single(
                    vision._ctx, ctx, chunk, n_past, seq_id, n_batch, False, ctypes.byref(reached))
                if status != 0:
                    raise RuntimeError(f"llama.cpp could not read an image of the prompt (status {status})")
                n_past = reached.value
            return n_past

        prompt.prelude = prelude
        weakref.finalize(prelude, mtmd_cpp.mtmd_input_chunks_free, chunks)  # the chunks live as long as it
        return prompt
