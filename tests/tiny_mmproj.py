"""A tiny vision projector for the small chat model, written with the `gguf` package.

No small vision model ships on PyPI, and `globalmm` (which builds real projectors) needs SigLIP's
weights from the Hugging Face hub, which these machines cannot reach. This writes what its
`build_mmproj` writes (llama.cpp's `gemma3` projector: a SigLIP-style vision tower, average
pooling, one projection into the language model's embedding space), with a one-layer tower and
random weights: what the model then "sees" is meaningless, but llama.cpp loads, encodes and
decodes it along the real path."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

BLOCK_TENSORS = ("ln1", "ln2", "attn_q", "attn_k", "attn_v", "attn_out", "ffn_up", "ffn_down")


def write_tiny_mmproj(path: Path, text_embedding: int, *, hidden: int = 64, ffn: int = 128, image: int = 56,
                      patch: int = 14, merge: int = 2) -> Path:
    """A projector turning any image into (image / patch / merge)^2 embeddings (4 by default)."""
    rng = np.random.default_rng(0)

    def weights(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_string("clip.projector_type", "gemma3")
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", False)
    writer.add_uint32("clip.vision.image_size", image)
    writer.add_uint32("clip.vision.patch_size", patch)
    writer.add_uint32("clip.vision.embedding_length", hidden)
    writer.add_uint32("clip.vision.feed_forward_length", ffn)
    writer.add_uint32("clip.vision.projection_dim", text_embedding)
    writer.add_uint32("clip.vision.block_count", 1)
    writer.add_uint32("clip.vision.attention.head_count", 2)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_bool("clip.use_gelu", True)
    writer.add_uint32("clip.vision.projector.scale_factor", merge)
    writer.add_tensor("v.patch_embd.weight", weights(hidden, 3, patch, patch))
    writer.add_tensor("v.patch_embd.bias", weights(hidden))
    writer.add_tensor("v.position_embd.weight", weights((image // patch) ** 2, hidden))
    for name in BLOCK_TENSORS:
        if name.startswith("ln"):
            writer.add_tensor(f"v.blk.0.{name}.weight", np.ones(hidden, np.float32))
            writer.add_tensor(f"v.blk.0.{name}.bias", np.zeros(hidden, np.float32))
            continue
        rows, columns = {"ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}.get(name, (hidden, hidden))
        writer.add_tensor(f"v.blk.0.{name}.weight", weights(rows, columns))
        writer.add_tensor(f"v.blk.0.{name}.bias", weights(rows))
    writer.add_tensor("v.post_ln.weight", np.ones(hidden, np.float32))
    writer.add_tensor("v.post_ln.bias", np.zeros(hidden, np.float32))
    writer.add_tensor("mm.input_projection.weight", weights(hidden, text_embedding))
    writer.add_tensor("mm.soft_emb_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
