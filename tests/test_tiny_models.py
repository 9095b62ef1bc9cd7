"""The tiny Stable Diffusion pipeline `localq models prepare` builds: layout, idempotence,
deterministic weights, and loading through diffusers' real `from_pretrained` path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from ops import tiny_models  # noqa: E402
from ops.cli import main  # noqa: E402
from workers.registry import ModelRegistry  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "tiny-diffusion"
    assert tiny_models.prepare_tiny_diffusion(path) is True
    return path


def test_layout(built):
    files = {str(p.relative_to(built)) for p in built.rglob("*") if p.is_file()}
    assert files == LAYOUT
    index = json.loads((built / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert (built / "tokenizer" / "merges.txt").read_text() == "#version: 0.2\n"
    vocab = json.loads((built / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 514
    assert vocab["<|startoftext|>"] == 512 and vocab["<|endoftext|>"] == 513
    assert "a</w>" in vocab and "a" in vocab
    assert not list(built.parent.glob(".tiny-diffusion-*"))  # no staging folder left behind


def test_prepare_is_idempotent_and_force_rebuilds_the_same_weights(built):
    unet = built / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet.read_bytes()
    assert tiny_models.prepare_tiny_diffusion(built) is False
    assert tiny_models.prepare_tiny_diffusion(built, force=True) is True
    assert unet.read_bytes() == before  # seeded: the same build every time


def test_loads_with_from_pretrained_and_paints_the_requested_size(built):
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(built, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    ids = pipe.tokenizer("A cat!").input_ids
    assert ids[0] == 512 and ids[-1] == 513 and len(ids) == 2 + len("a cat!") - 1  # one token per character
    for side in (64, 256):
        image = pipe("a cat", height=side, width=side, num_inference_steps=4,
                     generator=torch.Generator("cpu").manual_seed(0)).images[0]
        assert image.size == (side, side)


def test_shipped_config_points_at_the_default_location():
    config = ModelRegistry.load(REPO_ROOT / "models").resolve("tiny-diffusion")
    assert config.backend == "diffusers"
    assert set(config.aliases) >= {"dall-e-2", "dall-e-3", "gpt-image-1"}
    assert config.diffusers["pipeline_type"] == "StableDiffusionPipeline"
    assert config.diffusers["scheduler_type"] == "euler_a"
    assert config.step == 4 and config.cfg_scale == 7.5
    assert config.model_file.resolve() == tiny_models.tiny_diffusion_path().resolve()
    assert "var" in tiny_models.DEFAULT_DIR.parts  # git-ignored


def test_cli_models_prepare(tmp_path, capsys):
    assert main(["models", "prepare", "--dir", str(tmp_path)]) == 0
    assert "built tiny-diffusion" in capsys.readouterr().out
    assert tiny_models.is_prepared(tmp_path / "tiny-diffusion")
    assert main(["models", "prepare", "--dir", str(tmp_path)]) == 0
    assert "already" in capsys.readouterr().out


def test_cli_models_prepare_defaults_to_the_configs_path(tmp_path, monkeypatch, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.yaml").write_text(
        "name: tiny-diffusion\nbackend: diffusers\nparameters:\n  model: ../elsewhere/tiny\n", encoding="utf-8"
    )
    assert main(["--models-dir", str(models), "models", "prepare"]) == 0
    assert tiny_models.is_prepared(tmp_path / "elsewhere" / "tiny")
