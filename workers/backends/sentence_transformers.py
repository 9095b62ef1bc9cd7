"""sentence-transformers backend: embeddings, and tokenization with the model's tokenizer.

`parameters.model` is a local sentence-transformers folder (a path, or a `package://` reference);
nothing is ever fetched from the Hugging Face Hub.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads these once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from schemas.openai_errors import context_length_exceeded  # noqa: E402
from workers import devices  # noqa: E402
from workers.config import ModelConfig  # noqa: E402
from workers.errors import JobError  # noqa: E402

BATCH_SIZE = 32


class SentenceTransformersBackend:
    """One loaded sentence-transformers model."""

    def __init__(self, config: ModelConfig):
        path = config.locate_model()
        if config.threads:
            torch.set_num_threads(config.threads)
        device = devices.torch_device(config)  # cpu on a simulated GPU worker
        self.config = config
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.dimensions = self.model.get_embedding_dimension()
        self.max_tokens = self.model.max_seq_length or self.tokenizer.model_max_length
        self.vocab_size = len(self.tokenizer)
        self.normalises = any(type(module).__name__ == "Normalize" for module in self.model)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.model = None

    # -- tokenizer -----------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        self.check_tokens(tokens, "tokens")
        return self.tokenizer.decode(list(tokens), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def check_tokens(self, tokens: list[int], param: str) -> None:
        for token in tokens:
            if not 0 <= token < self.vocab_size:
                raise JobError(
                    400,
                    f"Invalid token id {token} in '{param}': this model's token ids are 0 to {self.vocab_size - 1}.",
                    param=param,
                    code="invalid_value",
                )

    # -- embeddings ----------------------------------------------------------------------------

    def embed(
        self,
        inputs: list[str] | list[list[int]],
        *,
        dimensions: int | None,
        cancelled: Callable[[], bool],
    ) -> tuple[list[list[float]], list[int]] | None:
        """(vectors as float32 values, each input's token count), or None when cancelled part way.

        Text goes through the model's own pipeline. Token-id inputs are taken as this model's
        token ids, used as given (add [CLS]/[SEP] yourself, as /tokenize does by default).
        With `dimensions`, vectors are cut to that length and, when the model normalises its
        output, normalised again (as OpenAI does for its shortened embeddings).
        """
        if dimensions is not None and self.dimensions is not None and dimensions > self.dimensions:
            raise JobError(
                400,
                f"This model's embeddings have {self.dimensions} dimensions; 'dimensions' cannot be larger.",
                param="dimensions",
                code="invalid_value",
            )
        texts = bool(inputs) and isinstance(inputs[0], str)
        if texts:
            ids = self.tokenizer(list(inputs), add_special_tokens=True)["input_ids"]
        else:
            ids = [list(tokens) for tokens in inputs]
            for tokens in ids:
                self.check_tokens(tokens, "input")
        for index, tokens in enumerate(ids):
            if len(tokens) > self.max_tokens:
                raise context_length_exceeded(
                    "input",
                    f"This model can embed at most {self.max_tokens} tokens per input. However, input "
                    f"{index} resulted in {len(tokens)} tokens. Please reduce its length.",
                )
        vectors: list[np.ndarray] = []
        with self._lock:
            for start in range(0, len(inputs), BATCH_SIZE):
                if cancelled():
                    return None
                if texts:
                    batch = self.model.encode(
                        list(inputs[start : start + BATCH_SIZE]),
                        batch_size=BATCH_SIZE,
                        convert_to_numpy=True,
                        show_progress_bar=False,
                    )
                else:
                    batch = self._encode_ids(ids[start : start + BATCH_SIZE])
                vectors.extend(np.asarray(batch, dtype=np.float32))
        out = []
        for vector in vectors:
            if dimensions is not None:
                vector = vector[:dimensions]
                if self.normalises:
                    norm = float(np.linalg.norm(vector))
                    vector = vector / norm if norm > 0 else vector
            out.append(vector.astype(np.float32).tolist())
        return out, [len(tokens) for tokens in ids]

    def _encode_ids(self, ids: list[list[int]]) -> np.ndarray:
        features = dict(self.tokenizer.pad({"input_ids": ids}, return_tensors="pt"))
        features = {key: value.to(self.model.device) for key, value in features.items()}
        with torch.no_grad():
            return self.model(features)["sentence_embedding"].float().cpu().numpy()
