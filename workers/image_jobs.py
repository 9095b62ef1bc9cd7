"""Image job kinds (`image`, `image_edit`) on the diffusers backend.

`unsupported` is the capability check the API runs before queueing (and `execute` again before
running): pure, and light, since the API process imports it; torch and diffusers are only ever
imported by the backend. The handlers resolve the request once more into pipeline arguments,
run the backend, and report:

- `progress` `{"step", "total_steps"}` after every denoising step;
- with `stream`, OpenAI's `image_generation.partial_image` / `image_edit.partial_image` deltas
  (the current estimate decoded at evenly spaced steps), then one `*.completed` delta per image;
- the ImagesResponse as the `result`; for `response_format: url`, each picture is a
  `FileOutput` the task layer stores and replaces by its URL.

OpenAI's schemas describe the picture (`size`, `quality`, `background`, `output_format`) only as
GPT image models report it: in an ImagesResponse only for those models and only with the values the
schema lists; in stream events always, with `auto` for a size the schema does not list.

Each image `i` of a job is seeded with `seed + i`; without a `seed` extension the seed is
derived from the job id, so a job delivered again replays the same pictures (and the partial
images already published stay valid) while two jobs still differ.
"""

from __future__ import annotations

import base64
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from workers import images
from workers.config import ModelConfig
from workers.errors import JobError
from workers.files import FileOutput, UploadedFile

EXTENSIONS = "x-localai-extensions"
Emit = Callable[[str, dict], None]
Cancelled = Callable[[], bool]

#: Extension knobs the diffusers backend honours, per kind.
IMAGE_EXTENSIONS = frozenset({
    "priority", "timeout", "negative_prompt", "steps", "guidance_scale", "scheduler", "clip_skip", "seed",
})
EDIT_EXTENSIONS = IMAGE_EXTENSIONS | {"strength"}
#: Knobs that LocalAI's `diffusers.enable_parameters` gates, by the pipeline argument it lists.
_GATED = {"negative_prompt": "negative_prompt", "steps": "num_inference_steps"}

_METADATA = frozenset({"model", "user", "prompt", EXTENSIONS})
_KIND_FIELDS = {
    "image": frozenset({
        "n", "size", "quality", "style", "background", "moderation", "output_format", "output_compression",
        "response_format", "stream", "partial_images",
    }),
    "image_edit": frozenset({
        "n", "size", "quality", "background", "moderation", "output_format", "output_compression",
        "response_format", "stream", "partial_images", "input_fidelity", "image", "mask", "images",
    }),
}
#: The sizes OpenAI's image schemas name (GPT image models); events also allow "auto".
SCHEMA_SIZES = frozenset({"1024x1024", "1024x1536", "1536x1024"})
_EVENT_TYPES = {
    "image": ("image_generation.partial_image", "image_generation.completed"),
    "image_edit": ("image_edit.partial_image", "image_edit.completed"),
}

Problem = tuple[str, str]


# ---------------------------------------------------------------------------------------------
# capability check
# ---------------------------------------------------------------------------------------------


def unsupported(kind: str, config: ModelConfig, request: dict) -> Problem | None:
    """`(param, message)` for the first part of `request` the model cannot honour, else None."""
    label = _label(config, request)
    limits = images.image_limits(config)
    allowed = _METADATA | _KIND_FIELDS[kind]

    def reject(param: str, why: str) -> Problem:
        return param, f"The model {label} cannot honour '{param}': {why}."

    for key, value in request.items():
        if key not in allowed:
            if value is None:
                continue
            return key, f"The model {label} does not support the '{key}' parameter."
    n = request.get("n") or 1
    if n > limits.max_images:
        return reject("n", f"it makes at most {limits.max_images} images per request")
    size = request.get("size")
    if size not in (None, "auto"):
        parsed = images.parse_size(size)
        if parsed is None:
            return reject("size", "expected WIDTHxHEIGHT in pixels, like 512x512, or auto")
        why = limits.size_problem(*parsed)
        if why is not None:
            return reject("size", why)
    quality = request.get("quality")
    if quality not in (None, "auto", "standard"):
        return reject("quality", "its quality is set by the denoising steps (x-localai-extensions.steps); "
                                 "only 'auto' and 'standard' are accepted")
    if request.get("style") is not None:
        return reject("style", "its pictures' style cannot be steered by this switch; describe it in the prompt")
    if request.get("background") == "transparent":
        return reject("background", "it only paints opaque pictures")
    if request.get("input_fidelity") not in (None, "low"):
        return reject("input_fidelity", "how closely an edit keeps the input is set by x-localai-extensions.strength")
    output_format = request.get("output_format") or "png"
    if output_format not in images.OUTPUT_FORMATS:
        return reject("output_format", "only png, jpeg and webp are produced")
    compression = request.get("output_compression")
    if compression is not None:
        if not 0 <= compression <= 100:
            return reject("output_compression", "it must be between 0 and 100")
        if output_format == "png" and compression != 100:
            return reject("output_compression", "png is lossless; compression applies to jpeg and webp")
    if request.get("response_format") not in (None, "url", "b64_json"):
        return reject("response_format", "only 'url' and 'b64_json' are produced")
    if request.get("stream") and n > 1:
        return reject("n", "a streamed request makes one image; send n 1 or do not stream")
    problem = _extension_problem(kind, config, request, reject)
    if problem is not None:
        return problem
    partial = request.get("partial_images") or 0
    steps = _steps(config, request)
    if partial > steps:
        return reject("partial_images", f"it runs {steps} denoising steps, so at most {steps} partial images exist")
    if kind == "image_edit":
        return _input_problem(request, reject)
    return None


def _extension_problem(kind: str, config: ModelConfig, request: dict, reject) -> Problem | None:
    knobs = request.get(EXTENSIONS)
    if not isinstance(knobs, Mapping):
        return None
    allowed = EDIT_EXTENSIONS if kind == "image_edit" else IMAGE_EXTENSIONS
    enabled = _enabled_parameters(config)
    for name, value in knobs.items():
        param = f"{EXTENSIONS}.{name}"
        if value is None:
            continue
        if name not in allowed:
            if name == "strength":
                return reject(param, "strength only applies to image edits")
            return reject(param, "the diffusers backend has no such control")
        if enabled is not None and name in _GATED and _GATED[name] not in enabled:
            return reject(param, f"its config's diffusers.enable_parameters does not list {_GATED[name]}")
        if name == "scheduler" and images.scheduler_spec(str(value)) is None:
            return reject(param, f"unknown scheduler {value!r} (known: {', '.join(images.scheduler_names())})")
    strength = knobs.get("strength")
    if kind == "image_edit" and strength is not None:
        steps = _steps(config, request)
        if int(steps * strength) < 1:
            return reject(f"{EXTENSIONS}.strength", f"with {steps} steps it leaves no step to run; "
                                                    f"send at least {1 / steps:.3g} or more steps")
    return None


def _input_problem(request: dict, reject) -> Problem | None:
    """The inputs of an edit: one picture (and maybe a mask), uploaded or as a data: URL."""
    uploaded = request.get("image")
    if isinstance(uploaded, list) and len(uploaded) > 1:
        return reject("image", "it edits one picture at a time; send a single image")
    refs = request.get("images")
    if isinstance(refs, list):
        if len(refs) > 1:
            return reject("images", "it edits one picture at a time; send a single image")
        for index, ref in enumerate(refs):
            problem = _ref_problem(ref, f"images[{index}]", reject)
            if problem is not None:
                return problem
    mask = request.get("mask")
    if isinstance(mask, Mapping):
        return _ref_problem(mask, "mask", reject)
    return None


def _ref_problem(ref: Any, param: str, reject) -> Problem | None:
    if not isinstance(ref, Mapping):
        return None
    if ref.get("file_id") is not None:
        return reject(f"{param}.file_id", "localq has no files store; send the image as a data: URL in image_url")
    url = ref.get("image_url")
    if isinstance(url, str) and not url[:5].lower() == "data:":
        return reject(f"{param}.image_url", "localq does not fetch remote images; send a data: URL")
    return None


def _label(config: ModelConfig, request: Mapping) -> str:
    sent = request.get("model")
    return f"'{sent}'" if isinstance(sent, str) and sent else f"'{config.name}'"


def _enabled_parameters(config: ModelConfig) -> set[str] | None:
    """LocalAI's `diffusers.enable_parameters` ("negative_prompt,num_inference_steps", "none"); None: all."""
    raw = (config.diffusers or {}).get("enable_parameters")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    names = raw if isinstance(raw, list) else str(raw).split(",")
    enabled = {str(name).strip() for name in names if str(name).strip()}
    return set() if enabled == {"none"} else enabled


def _extensions(request: Mapping) -> Mapping:
    knobs = request.get(EXTENSIONS)
    return knobs if isinstance(knobs, Mapping) else {}


def _steps(config: ModelConfig, request: Mapping) -> int:
    return _extensions(request).get("steps") or config.step or images.DEFAULT_STEPS


# ---------------------------------------------------------------------------------------------
# handlers
# ---------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    task: str  # text2img, img2img, inpaint
    width: int
    height: int
    image: Any = None  # PIL, RGB, width x height
    mask: Any = None  # PIL, L, white = repaint


def _image(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    limits = images.image_limits(config)
    size = job["request"].get("size")
    width, height = limits.default_size if size in (None, "auto") else images.parse_size(size)
    _run(job, config, backend, emit, cancelled, _Inputs("text2img", width, height))


def _image_edit(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled) -> None:
    _run(job, config, backend, emit, cancelled, _edit_inputs(job["request"], images.image_limits(config)))


def _run(job: dict, config: ModelConfig, backend: Any, emit: Emit, cancelled: Cancelled, inputs: _Inputs) -> None:
    request, kind = job["request"], job["kind"]
    knobs = _extensions(request)
    prompt = request.get("prompt") or ""
    text_tokens = backend.count_tokens(prompt, param="prompt")
    negative = knobs.get("negative_prompt")
    if negative is not None:
        backend.count_tokens(negative, param=f"{EXTENSIONS}.negative_prompt")
    n = request.get("n") or 1
    output_format = request.get("output_format") or "png"
    compression = request.get("output_compression")
    stream = bool(request.get("stream"))
    partial_images = (request.get("partial_images") or 0) if stream else 0
    seed = knobs.get("seed")
    if seed is None:
        seed = zlib.crc32(str(job["id"]).encode("utf-8"))
    size = images.format_size(inputs.width, inputs.height)
    partial_type, completed_type = _EVENT_TYPES[kind]
    usage = {
        "total_tokens": text_tokens,
        "input_tokens": text_tokens,
        "output_tokens": 0,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
    }
    described = {"size": size if size in SCHEMA_SIZES else "auto", "quality": "auto", "background": "opaque",
                 "output_format": output_format}
    sent_partials = 0

    def on_step(step: int, total: int, preview: Callable[[], list]) -> None:
        nonlocal sent_partials
        emit("progress", {"step": step, "total_steps": total})
        if sent_partials < partial_images and step in _partial_steps(partial_images, total):
            picture = preview()[0]
            emit("delta", {
                "type": partial_type,
                "b64_json": _b64(images.encode(picture, output_format, compression)),
                "created_at": int(time.time()),
                **described,
                "partial_image_index": sent_partials,
            })
            sent_partials += 1

    pictures = backend.generate(
        inputs.task,
        prompt=prompt,
        width=inputs.width,
        height=inputs.height,
        n=n,
        seed=seed,
        steps=_steps(config, request),
        guidance_scale=_guidance(config, knobs),
        negative_prompt=negative,
        scheduler=knobs.get("scheduler"),
        clip_skip=knobs.get("clip_skip"),
        strength=knobs.get("strength"),
        image=inputs.image,
        mask=inputs.mask,
        on_step=on_step,
        cancelled=cancelled,
    )
    if pictures is None:  # cancelled
        return
    encoded = [images.encode(picture, output_format, compression) for picture in pictures]
    if stream:
        for data in encoded:
            emit("delta", {
                "type": completed_type,
                "b64_json": _b64(data),
                "created_at": int(time.time()),
                **described,
                "usage": usage,
            })
    as_url = _response_format(job) == "url"
    media_type = images.media_type(output_format)
    emit("result", {
        "created": job["created"],
        "data": [
            {"url": FileOutput(data, media_type, output_format)} if as_url else {"b64_json": _b64(data)}
            for data in encoded
        ],
        **_picture_fields(job, size, output_format),
        "usage": {
            "input_tokens": text_tokens,
            "output_tokens": 0,
            "total_tokens": text_tokens,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
        },
    })


def _partial_steps(count: int, total: int) -> set[int]:
    """The steps after which the `count` partial images are taken: evenly spaced, the last
    step excluded unless there are as many partial images as steps."""
    return {(k * total + count) // (count + 1) for k in range(1, count + 1)} - {0}


def _guidance(config: ModelConfig, knobs: Mapping) -> float:
    value = knobs.get("guidance_scale")
    if value is None:
        value = config.cfg_scale
    return float(images.DEFAULT_GUIDANCE_SCALE if value is None else value)


def _response_format(job: dict) -> str:
    """The request's response_format; by default b64_json for gpt-image models (which only
    answer that way, as does the JSON edit body) and url for dall-e ones."""
    chosen = job["request"].get("response_format")
    if chosen:
        return chosen
    return "b64_json" if _gpt_image(job) else "url"


def _gpt_image(job: dict) -> bool:
    """Whether the client asked for a GPT image model (by name, or with the JSON edit body they alone take)."""
    request = job["request"]
    model = str(request.get("model") or job.get("model") or "").lower()
    return "images" in request or model.startswith(("gpt-image", "chatgpt-image"))


def _picture_fields(job: dict, size: str, output_format: str) -> dict:
    """What an ImagesResponse says about its pictures: as a GPT image model says it, else nothing
    (dall-e answers carry only the data). No `quality`: the schema's low/medium/high have no
    diffusers meaning, and a size it does not list is left out."""
    if not _gpt_image(job):
        return {}
    fields = {"background": "opaque", "output_format": output_format}
    if size in SCHEMA_SIZES:
        fields["size"] = size
    return fields


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------
# edit inputs
# ---------------------------------------------------------------------------------------------


def _edit_inputs(request: dict, limits: images.ImageLimits) -> _Inputs:
    """Decode the picture and mask of an edit; img2img, or inpaint when there is a mask (or,
    as with OpenAI's dall-e-2, when the picture has transparent parts and no mask is sent)."""
    from PIL import Image

    if "images" in request:
        param = "images[0].image_url"
        picture = images.decode(images.data_url_bytes(request["images"][0].get("image_url"), param), param)
    else:
        param = "image"
        upload = request.get("image")
        if isinstance(upload, list):
            upload = upload[0] if upload else None
        picture = images.decode(_upload_bytes(upload, param), param)
    mask_ref = request.get("mask")
    mask = None
    if mask_ref is not None:
        if isinstance(mask_ref, Mapping):
            mask_param = "mask.image_url"
            mask_data = images.data_url_bytes(mask_ref.get("image_url"), mask_param)
        else:
            mask_param = "mask"
            mask_data = _upload_bytes(mask_ref, mask_param)
        mask_picture = images.decode(mask_data, mask_param)
        if mask_picture.size != picture.size:
            raise JobError(
                400, f"The mask is {images.format_size(*mask_picture.size)} but the image is "
                f"{images.format_size(*picture.size)}; they must be the same size.",
                param="mask", code="invalid_image",
            )
        alpha = _alpha(mask_picture)
        if alpha is None:
            raise JobError(
                400, "The mask must have an alpha channel: its fully transparent areas mark what to repaint.",
                param="mask", code="invalid_image",
            )
        mask = alpha
    else:
        alpha = _alpha(picture)
        if alpha is not None and alpha.getextrema()[0] < 255:
            mask = alpha
    if mask is not None:
        # OpenAI: transparent = edit here; diffusers: white = repaint
        mask = mask.point(lambda value: 255 - value)
    size = request.get("size")
    if size in (None, "auto"):
        width, height = images.fit_size(*picture.size, limits)
    else:
        width, height = images.parse_size(size)
    rgb = picture.convert("RGB")
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    if mask is not None and mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.NEAREST)
    return _Inputs("inpaint" if mask is not None else "img2img", width, height, rgb, mask)


def _upload_bytes(upload: Any, param: str) -> bytes:
    if isinstance(upload, UploadedFile):
        return upload.data
    if isinstance(upload, (bytes, bytearray)):
        return bytes(upload)
    raise JobError(400, f"'{param}' must be an uploaded image file.", param=param, code="invalid_image")


def _alpha(picture):
    """The alpha channel (mode L) of a picture that has one, else None."""
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        return picture.convert("RGBA").getchannel("A")
    return None


HANDLERS: dict[str, Callable[..., None]] = {"image": _image, "image_edit": _image_edit}
