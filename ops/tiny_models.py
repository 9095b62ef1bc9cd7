"""A tiny Stable Diffusion pipeline, built locally from configs, for smoke tests and demos.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are built from small configs with
deterministic random weights, and the CLIP tokenizer's files are generated here (a byte-level
vocabulary with no merges, so every character is one token). The result is a genuine diffusers
folder (`model_index.json`, one subfolder per component) that loads with
`DiffusionPipeline.from_pretrained` like any real Stable Diffusion checkpoint. Its pictures are
noise-like: the weights were never trained. Geometry matches SD 1.x: the VAE scales by 8 and
the UNet's native latent size is 32, so its native picture is 256x256 (any multiple of 8 works).

torch, diffusers and transformers are imported only when a pipeline is built.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

#: The folder name under the target directory, and the name of its model config.
TINY_DIFFUSION = "tiny-diffusion"
#: Where `localq models prepare` puts it by default (`var/` is git-ignored); the shipped
#: config `models/tiny-diffusion.yaml` points here as `../var/models/tiny-diffusion`.
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "var" / "models"

_SEED = 0
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_MAX_LENGTH = 77  # CLIP's prompt length, as every SD pipeline expects


def tiny_diffusion_path(directory: Path | str | None = None) -> Path:
    """Where the tiny pipeline lives under `directory` (default: `var/models`)."""
    return Path(directory if directory is not None else DEFAULT_DIR) / TINY_DIFFUSION


def is_prepared(path: Path | str) -> bool:
    """True when `path` holds a complete pipeline (its `model_index.json` is written last)."""
    return (Path(path) / "model_index.json").is_file()


def prepare_tiny_diffusion(path: Path | str, *, force: bool = False) -> bool:
    """Build the tiny pipeline into the folder `path`; False when it was already there.

    The folder is assembled next to `path` and renamed into place, so an interrupted build
    never leaves a half-written pipeline behind, and one built by another process meanwhile is kept
    (never deleted under a worker loading it). `force` rebuilds an existing one.
    """
    path = Path(path)
    if is_prepared(path) and not force:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        build_tiny_diffusion(staging)
        if path.exists() and (force or not is_prepared(path)):
            shutil.rmtree(path)
        try:
            staging.rename(path)
        except OSError:
            if not is_prepared(path):
                raise
            shutil.rmtree(staging)  # another process (a parallel test worker) put one in place first
            return False
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return True


def build_tiny_diffusion(path: Path) -> None:
    """Write the tiny pipeline's files into the (existing, empty) folder `path`."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer_dir = path / "tokenizer"
    vocab_size = write_clip_vocab(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=_MAX_LENGTH)
    # Weights are random but deterministic: the same build gives the same pictures.
    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        # four blocks: three downsamplings, so pictures are 8 times the latents, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_LENGTH,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = PNDMScheduler(  # Stable Diffusion 1.x's scheduler settings
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)


def write_clip_vocab(directory: Path) -> int:
    """Write a CLIP tokenizer's `vocab.json` and `merges.txt` into `directory`; the vocab size.

    CLIP's layout without merges: the 256 byte symbols, the same with `</w>` (end of word),
    then the start and end tokens.
    """
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [_BOS, _EOS]
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: index for index, token in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))
