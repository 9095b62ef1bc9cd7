"""Image helpers shared by the capability checks and the diffusers backend.

Light on purpose: the API runs the checks before queueing, so this module imports nothing
heavy at import time (Pillow is imported by the functions that encode or decode pictures).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

from workers.config import ModelConfig, ModelConfigError
from workers.errors import JobError

#: Picture sides must be multiples of this: the Stable Diffusion VAEs downscale by 8.
SIZE_MULTIPLE = 8
#: Smallest side accepted (smaller latents break the UNet's downsampling).
MIN_SIDE = 64
#: Defaults of the `diffusers:` config keys localq adds to LocalAI's shape.
DEFAULT_SIZE = (512, 512)
DEFAULT_MAX_SIDE = 1024
DEFAULT_MAX_IMAGES = 4
#: Denoising steps and guidance scale when neither the request nor the config sets them.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE_SCALE = 7.5

#: output_format -> (media type, Pillow format name)
OUTPUT_FORMATS = {
    "png": ("image/png", "PNG"),
    "jpeg": ("image/jpeg", "JPEG"),
    "webp": ("image/webp", "WEBP"),
}

_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")

# --- schedulers -----------------------------------------------------------------------------

#: LocalAI's scheduler names -> (diffusers class, extra config). A `k_` prefix on a name whose
#: class supports it switches to Karras sigmas (`k_euler`, `k_dpmpp_2m`, ...), as in LocalAI.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_sde": ("DPMSolverSinglestepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
}
_KARRAS = {"lms", "euler", "heun", "dpm_2", "dpm_2_a", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde", "unipc", "deis"}


def scheduler_spec(name: str) -> tuple[str, dict[str, Any]] | None:
    """(diffusers scheduler class name, extra config) for a scheduler name; None if unknown."""
    key = name.strip().lower()
    if key in SCHEDULERS:
        return SCHEDULERS[key]
    if key.startswith("k_") and key[2:] in _KARRAS:
        class_name, extra = SCHEDULERS[key[2:]]
        return class_name, {**extra, "use_karras_sigmas": True}
    return None


def scheduler_names() -> list[str]:
    """Every accepted scheduler name, for error messages."""
    return sorted(SCHEDULERS) + sorted(f"k_{name}" for name in _KARRAS)


# --- sizes and limits -----------------------------------------------------------------------


def parse_size(text: Any) -> tuple[int, int] | None:
    """(width, height) of a `WxH` string; None when it is not one."""
    if not isinstance(text, str):
        return None
    match = _SIZE.match(text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


@dataclass(frozen=True)
class ImageLimits:
    """What one image model accepts, from its config's `diffusers:` keys."""

    default_size: tuple[int, int] = DEFAULT_SIZE  # `diffusers.default_size` ("WxH"), used for `auto`
    max_side: int = DEFAULT_MAX_SIDE  # `diffusers.max_size`: the longest side allowed, in pixels
    max_images: int = DEFAULT_MAX_IMAGES  # `diffusers.max_images`: the largest `n`

    def size_problem(self, width: int, height: int) -> str | None:
        """Why `width`x`height` cannot be produced, or None."""
        for side in (width, height):
            if side % SIZE_MULTIPLE:
                return f"both sides must be multiples of {SIZE_MULTIPLE} pixels"
            if side < MIN_SIDE:
                return f"both sides must be at least {MIN_SIDE} pixels"
            if side > self.max_side:
                return f"both sides must be at most {self.max_side} pixels"
        return None


def image_limits(config: ModelConfig) -> ImageLimits:
    """The limits `config` sets; ModelConfigError naming the file when a value is malformed."""
    options = config.diffusers or {}
    prefix = f"{config.source}: diffusers"
    max_side = options.get("max_size", DEFAULT_MAX_SIDE)
    if not _positive_int(max_side) or max_side < MIN_SIDE:
        raise ModelConfigError(f"{prefix}.max_size: expected a whole number of pixels, at least {MIN_SIDE}")
    max_images = options.get("max_images", DEFAULT_MAX_IMAGES)
    if not _positive_int(max_images):
        raise ModelConfigError(f"{prefix}.max_images: expected a whole number, at least 1")
    raw_size = options.get("default_size")
    default_size = DEFAULT_SIZE if raw_size is None else parse_size(raw_size)
    if default_size is None:
        raise ModelConfigError(f"{prefix}.default_size: expected WIDTHxHEIGHT, like 512x512")
    limits = ImageLimits(default_size, max_side, max_images)
    why = limits.size_problem(*default_size)
    if why is not None and raw_size is not None:
        raise ModelConfigError(f"{prefix}.default_size: {raw_size!r} cannot be produced: {why}")
    if why is not None:  # the built-in default above a small max_size: shrink it to fit
        side = max_side - max_side % SIZE_MULTIPLE
        limits = ImageLimits((side, side), max_side, max_images)
    return limits


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def fit_size(width: int, height: int, limits: ImageLimits) -> tuple[int, int]:
    """The largest producible size with (about) the aspect ratio of `width`x`height`."""
    scale = min(1.0, limits.max_side / max(width, height))
    if min(width, height) * scale < MIN_SIDE:
        scale = MIN_SIDE / min(width, height)
    fitted = []
    for side in (width, height):
        side = int(side * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE
        fitted.append(min(max(side, MIN_SIDE), limits.max_side - limits.max_side % SIZE_MULTIPLE))
    return fitted[0], fitted[1]


# --- encoding and decoding ------------------------------------------------------------------


def encode(image, output_format: str = "png", compression: int | None = None) -> bytes:
    """The bytes of a PIL image as png, jpeg or webp.

    `compression` is OpenAI's `output_compression` (0-100), used as the jpeg/webp quality;
    None means 100, OpenAI's default. PNG is lossless and takes no compression level.
    """
    _, pillow_format = OUTPUT_FORMATS[output_format]
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format=pillow_format)
    else:
        quality = 100 if compression is None else int(compression)
        image.convert("RGB").save(buffer, format=pillow_format, quality=quality)
    return buffer.getvalue()


def media_type(output_format: str) -> str:
    return OUTPUT_FORMATS[output_format][0]


def decode(data: bytes, param: str):
    """A fully loaded PIL image from uploaded bytes; JobError 400 naming `param` if undecodable."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError:
        why = "it has too many pixels"
    except UnidentifiedImageError:
        why = "its format is not recognised, or it is cut short"
    except (OSError, ValueError, SyntaxError):  # Pillow's own words name its internals: not repeated
        why = "it is truncated or corrupt"
    else:
        return image
    raise JobError(400, f"The file in '{param}' is not an image that can be read: {why}.", param=param,
                   code="invalid_image")


def data_url_bytes(url: str, param: str) -> bytes:
    """The bytes of a `data:` URL; JobError 400 for any other URL (workers never fetch)."""
    if not isinstance(url, str) or not url.lower().startswith("data:"):
        raise JobError(
            400, f"'{param}' must be a data: URL with the image inline; localq does not fetch remote images.",
            param=param, code="invalid_image_url",
        )
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise JobError(400, f"'{param}' is not a valid data: URL (no comma).", param=param, code="invalid_image_url")
    if header.lower().endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise JobError(
                400, f"The base64 data in '{param}' is not valid.", param=param, code="invalid_image_url"
            ) from None
    return unquote_to_bytes(payload)
