"""diffusers backend: image generation and edits with a Stable Diffusion family pipeline.

The model (`parameters.model`) is either a diffusers folder (`model_index.json` and one
subfolder per component), loaded with `from_pretrained` of the class `diffusers.pipeline_type`
names (default: `DiffusionPipeline`, which reads the class from `model_index.json`), or one
`.safetensors`/`.ckpt` checkpoint, loaded with that class's `from_single_file` (default:
`StableDiffusionPipeline`, as in LocalAI; `img2img: true` means `StableDiffusionImg2ImgPipeline`).

One load serves every task: the text-to-image, image-to-image and inpainting pipelines are
derived from the loaded one with diffusers' `AutoPipelineFor*.from_pipe`, which shares the
components (no second copy of the weights).

Every run gets a fresh scheduler built from the loaded one's config (the request's `scheduler`,
else the config's `scheduler_type`, else the model's own), so runs never share scheduler state.
A step callback reports progress, decodes previews on demand, and stops the run as soon as
the job is cancelled.
"""

from __future__ import annotations

import functools
import gc
import inspect
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoPipelineForImage2Image,
    AutoPipelineForInpainting,
    AutoPipelineForText2Image,
    DiffusionPipeline,
)

from schemas.openai_errors import context_length_exceeded, unsupported_parameter
from workers import devices
from workers.config import ModelConfig, ModelConfigError
from workers.images import image_limits, scheduler_names, scheduler_spec

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_TASKS = {
    "text2img": (AutoPipelineForText2Image, "generate images"),
    "img2img": (AutoPipelineForImage2Image, "edit images"),
    "inpaint": (AutoPipelineForInpainting, "edit images with a mask"),
}
_EXT = "x-localai-extensions"

#: `on_step(step, total_steps, preview)`: `preview()` decodes the current estimate into PIL images.
OnStep = Callable[[int, int, Callable[[], list]], None]


class _Stop(Exception):
    """Raised from the step callback to end a cancelled run at once (no final decode)."""


class DiffusersBackend:
    """One loaded diffusers pipeline."""

    def __init__(self, config: ModelConfig):
        self.config = config
        self.limits = image_limits(config)  # malformed limits stop the load, naming the file
        options = config.diffusers or {}
        self.device = _device(config)
        self.dtype = torch.float16 if self.device == "cuda" and config.f16 else torch.float32
        if config.threads and self.device == "cpu":
            torch.set_num_threads(config.threads)
        path = config.locate_model()
        if not path.is_dir() and path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise ModelConfigError(
                f"{config.source}: parameters.model: {path} is neither a diffusers folder nor a checkpoint "
                f"file ({', '.join(_SINGLE_FILE_SUFFIXES)})"
            )
        cls = _pipeline_class(config, single_file=not path.is_dir())
        try:
            if path.is_dir():
                pipe = cls.from_pretrained(path, dtype=self.dtype)
            else:
                pipe = cls.from_single_file(str(path), dtype=self.dtype, **_single_file_options(config))
        except (OSError, ValueError) as exc:
            raise ModelConfigError(
                f"{config.source}: parameters.model: diffusers cannot load {path} as {cls.__name__}: {exc}"
            ) from exc
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        _clip_skip_compat(pipe)
        self.pipe = pipe
        self._scheduler_config = pipe.scheduler.config
        self._scheduler_class = type(pipe.scheduler)
        self.default_scheduler = options.get("scheduler_type") or None
        if self.default_scheduler is not None:
            # checked now, so a typo in the config fails the load rather than every job
            self._scheduler(self.default_scheduler, param=None)
        clip_skip = options.get("clip_skip")
        if clip_skip is not None and (not isinstance(clip_skip, int) or isinstance(clip_skip, bool) or clip_skip < 0):
            raise ModelConfigError(f"{config.source}: diffusers.clip_skip: expected a whole number, at least 0")
        self.default_clip_skip = clip_skip or None
        self._pipes: dict[str, DiffusionPipeline] = {}
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._pipes.clear()
            self.pipe = None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8) or 8)

    # -- prompts -------------------------------------------------------------------------------

    def count_tokens(self, text: str, *, param: str) -> int:
        """Tokens of `text` (without the start and end tokens) for the model's text encoder.

        JobError 400 when the text is longer than the encoder reads: the pipeline would cut it
        off silently.
        """
        tokenizer = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
        if tokenizer is None:
            return 0
        with self._lock:
            ids = tokenizer(text, truncation=False, add_special_tokens=False).input_ids
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and limit < 100_000 and len(ids) > limit - 2:
            raise context_length_exceeded(
                param,
                f"This model reads at most {limit - 2} prompt tokens. However, your {param} resulted in "
                f"{len(ids)} tokens. Please shorten it.",
            )
        return len(ids)

    # -- generation ----------------------------------------------------------------------------

    def generate(
        self,
        task: str,
        *,
        prompt: str,
        width: int,
        height: int,
        n: int,
        seed: int,
        steps: int,
        guidance_scale: float,
        negative_prompt: str | None = None,
        scheduler: str | None = None,
        clip_skip: int | None = None,
        strength: float | None = None,
        image=None,
        mask=None,
        on_step: OnStep | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> list | None:
        """`n` PIL images, or None when `cancelled()` turned true (checked after every step).

        `task` is "text2img", "img2img" (needs `image`) or "inpaint" (needs `image` and `mask`,
        white = repaint). Image `i` is seeded with `seed + i`. `image` and `mask` must already
        be `width`x`height`.
        """
        with self._lock:
            pipe = self._pipeline(task)
            accepted = set(inspect.signature(pipe.__call__).parameters)
            clip_skip = clip_skip if clip_skip is not None else self.default_clip_skip
            self._check_clip_skip(pipe, clip_skip)
            kwargs: dict[str, Any] = {
                "prompt": prompt,
                "num_images_per_prompt": n,
                "num_inference_steps": steps,
                "guidance_scale": guidance_scale,
                "output_type": "pil",
            }
            optional = {"negative_prompt": negative_prompt, "clip_skip": clip_skip or None, "strength": strength}
            for knob, value in optional.items():
                if value is None:
                    continue
                if knob not in accepted:
                    raise unsupported_parameter(
                        f"{_EXT}.{knob}",
                        f"The model '{self.config.name}' cannot honour '{_EXT}.{knob}': its "
                        f"{type(pipe).__name__} has no {knob} control.",
                    )
                kwargs[knob] = value
            if task == "img2img":
                kwargs["image"] = image
            else:
                kwargs["height"], kwargs["width"] = height, width
            if task == "inpaint":
                kwargs["image"], kwargs["mask_image"] = image, mask
            if n > 1 and "num_images_per_prompt" not in accepted:
                raise unsupported_parameter(
                    "n",
                    f"The model '{self.config.name}' makes one image per request.",
                )
            factor = self.vae_scale_factor
            if width % factor or height % factor:
                raise unsupported_parameter(
                    "size",
                    f"This model's sizes must be multiples of {factor} pixels.",
                )
            pipe.scheduler = self._scheduler(scheduler or self.default_scheduler, param=f"{_EXT}.scheduler")
            preview_source = _capture_estimates(pipe.scheduler)
            generators = [torch.Generator(self.device).manual_seed((seed + i) % 2**64) for i in range(n)]
            kwargs["generator"] = generators if n > 1 else generators[0]

            def callback(pipeline, index, timestep, tensors):
                latents = tensors.get("latents")
                total = int(getattr(pipeline, "_num_timesteps", 0) or steps)
                if on_step is not None:
                    on_step(index + 1, total, lambda: self._decode(pipeline, preview_source(latents)))
                if cancelled():
                    raise _Stop
                return {}

            kwargs["callback_on_step_end"] = callback
            kwargs["callback_on_step_end_tensor_inputs"] = ["latents"]
            try:
                with torch.inference_mode():
                    output = pipe(**{k: v for k, v in kwargs.items() if k in accepted})
            except _Stop:
                return None
            return list(output.images)

    # -- pieces --------------------------------------------------------------------------------

    def _pipeline(self, task: str) -> DiffusionPipeline:
        """The pipeline for `task`, derived once from the loaded one (components shared)."""
        pipe = self._pipes.get(task)
        if pipe is not None:
            return pipe
        auto, what = _TASKS[task]
        try:
            pipe = auto.from_pipe(self.pipe)
        except (ValueError, KeyError, TypeError) as exc:
            raise unsupported_parameter(
                "model",
                f"The model '{self.config.name}' cannot {what}: diffusers has no {task} pipeline "
                f"for its {type(self.pipe).__name__} ({exc}).",
            ) from None
        pipe.set_progress_bar_config(disable=True)
        self._pipes[task] = pipe
        return pipe

    def _scheduler(self, name: str | None, *, param: str | None):
        """A fresh scheduler: `name`'s class from the model's scheduler config, else the model's own."""
        if not name:
            return self._scheduler_class.from_config(self._scheduler_config)
        spec = scheduler_spec(name)
        cls = getattr(diffusers, spec[0], None) if spec else None
        where = f"The model '{self.config.name}'"
        if cls is None:
            why = f"unknown scheduler {name!r} (known: {', '.join(scheduler_names())})"
        elif cls not in self._scheduler_class._get_compatibles():
            why = f"scheduler {name!r} ({cls.__name__}) does not suit its {self._scheduler_class.__name__}"
        else:
            return cls.from_config(self._scheduler_config, **spec[1])
        if param is None:
            raise ModelConfigError(f"{self.config.source}: diffusers.scheduler_type: {why}")
        raise unsupported_parameter(param, f"{where} cannot honour '{param}': {why}.")

    def _check_clip_skip(self, pipe: DiffusionPipeline, clip_skip: int | None) -> None:
        if not clip_skip:
            return
        encoder = getattr(pipe, "text_encoder", None) or getattr(pipe, "text_encoder_2", None)
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if isinstance(layers, int) and clip_skip >= layers:
            raise unsupported_parameter(
                f"{_EXT}.clip_skip",
                f"This model's text encoder has {layers} layers, so '{_EXT}.clip_skip' must be below {layers}.",
            )

    def _decode(self, pipe: DiffusionPipeline, latents: torch.Tensor) -> list:
        """PIL images of (Stable Diffusion style, 4-D) latents, decoded with the VAE."""
        if latents is None or latents.ndim != 4 or getattr(pipe, "vae", None) is None:
            raise unsupported_parameter(
                "partial_images",
                f"The model '{self.config.name}' cannot show partial images.",
            )
        vae = pipe.vae
        config = vae.config
        upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
        if upcast:
            vae.to(torch.float32)
        try:
            latents = latents.to(device=vae.device, dtype=vae.dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                mean = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
                std = torch.tensor(std).view(1, -1, 1, 1).to(latents)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
                if getattr(config, "shift_factor", None):
                    latents = latents + config.shift_factor
            with torch.inference_mode():
                decoded = vae.decode(latents, return_dict=False)[0]
            return pipe.image_processor.postprocess(decoded, output_type="pil")
        finally:
            if upcast:
                vae.to(torch.float16)


def _capture_estimates(scheduler) -> Callable[[torch.Tensor], torch.Tensor]:
    """Record the scheduler's estimate of the finished latents at each step, for previews.

    Most schedulers return it (`pred_original_sample`, LCM's `denoised`) but pipelines keep only
    the next noisy latents, which decode to noise early on. Returns `preview(latents)`: the last
    estimate, else `latents` themselves.
    """
    original = scheduler.step
    latest: dict[str, torch.Tensor | None] = {"x0": None}

    # wraps: pipelines read step's signature to decide whether to pass `generator` and `eta`
    @functools.wraps(original)
    def step(*args, **kwargs):
        wants_dict = kwargs.get("return_dict", True)
        kwargs["return_dict"] = True
        output = original(*args, **kwargs)
        estimate = getattr(output, "pred_original_sample", None)
        if estimate is None:
            estimate = getattr(output, "denoised", None)
        latest["x0"] = estimate
        return output if wants_dict else output.to_tuple()

    scheduler.step = step

    def preview(latents: torch.Tensor) -> torch.Tensor:
        estimate = latest["x0"]
        return estimate if estimate is not None and latents is not None and estimate.shape == latents.shape else latents

    return preview


def _clip_skip_compat(pipe: DiffusionPipeline) -> None:
    """Let diffusers' clip_skip code find the text encoder's final layer norm.

    Stable Diffusion pipelines reach it as `text_encoder.text_model.final_layer_norm`, but
    transformers 5 flattened CLIPTextModel (the norm is now `text_encoder.final_layer_norm`).
    The alias is a plain attribute, not a registered submodule, so weights, `.to()` and saving
    are unaffected.
    """
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name, None)
        if encoder is not None and not hasattr(encoder, "text_model") and hasattr(encoder, "final_layer_norm"):
            object.__setattr__(encoder, "text_model", encoder)


def _device(config: ModelConfig) -> str:
    """cuda when the config's device is gpu (unless `diffusers.cuda: false`, or on a simulated GPU
    worker: see workers.devices), else cpu."""
    if not devices.uses_gpu(config) or (config.diffusers or {}).get("cuda") is False:
        return "cpu"
    if not torch.cuda.is_available():
        raise ModelConfigError(f"{config.source}: device: gpu, but torch sees no CUDA device on this worker")
    return "cuda"


def _pipeline_class(config: ModelConfig, *, single_file: bool) -> type:
    """The diffusers class `diffusers.pipeline_type` names (LocalAI's names are diffusers' own)."""
    options = config.diffusers or {}
    name = options.get("pipeline_type")
    if not name:
        if options.get("img2img"):
            name = "StableDiffusionImg2ImgPipeline"
        else:
            name = "StableDiffusionPipeline" if single_file else "DiffusionPipeline"
    cls = getattr(diffusers, str(name), None)
    pipeline_like = isinstance(cls, type) and (
        issubclass(cls, DiffusionPipeline) or cls in (AutoPipelineForText2Image, AutoPipelineForImage2Image,
                                                      AutoPipelineForInpainting)
    )
    if not pipeline_like:
        raise ModelConfigError(
            f"{config.source}: diffusers.pipeline_type: {name!r} is not a diffusers pipeline class"
        )
    if single_file and not hasattr(cls, "from_single_file"):
        raise ModelConfigError(
            f"{config.source}: diffusers.pipeline_type: {name} cannot load a single checkpoint file; "
            "point parameters.model at a diffusers folder instead"
        )
    return cls


def _single_file_options(config: ModelConfig) -> dict[str, Any]:
    """`diffusers.config`: a diffusers folder (or hub id) holding the component configs of a
    single-file checkpoint; without it diffusers looks the configs up on the Hugging Face hub."""
    extra = (config.diffusers or {}).get("config")
    if not extra:
        return {}
    candidate = Path(str(extra))
    if not candidate.is_absolute():
        candidate = config.source.parent / candidate
    return {"config": str(candidate) if candidate.exists() else str(extra)}
