"""The images a chat request carries (`image_url` content parts), as RGB pixels a vision model reads.

A part is a `data:` URL (base64), or, only where the operator allows it, an `http(s)` URL fetched
under limits: a size cap read as the body streams, a time limit, an image content type, no
redirect followed blindly, and never an address on this machine or a private network (every
address the name resolves to is checked, so a URL cannot reach the Redis or the API behind it).
Images are decoded with Pillow under a pixel limit (a small file that unpacks to gigapixels is
refused) and handed over as RGB bytes, so every format Pillow reads works, whatever the vision
library would read on its own. Every failure is an `ImageInputError` naming the part.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what a client may send (OpenAI takes the first four)
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024  # OpenAI's per-image limit
    max_pixels: int = 40_000_000
    fetch_urls: bool = False  # http(s) URLs: off unless the operator turns them on
    fetch_timeout: float = 10.0

    @classmethod
    def from_env(cls, environ: dict | None = None) -> ImageLimits:
        """`LOCALQ_IMAGE_URLS` (1 to fetch http(s) image URLs), `LOCALQ_MAX_IMAGE_BYTES`,
        `LOCALQ_MAX_IMAGE_PIXELS`, `LOCALQ_IMAGE_FETCH_TIMEOUT` (seconds)."""
        env = os.environ if environ is None else environ
        return cls(
            max_bytes=int(env.get("LOCALQ_MAX_IMAGE_BYTES", cls.max_bytes)),
            max_pixels=int(env.get("LOCALQ_MAX_IMAGE_PIXELS", cls.max_pixels)),
            fetch_urls=env.get("LOCALQ_IMAGE_URLS", "0").lower() in ("1", "true", "yes"),
            fetch_timeout=float(env.get("LOCALQ_IMAGE_FETCH_TIMEOUT", cls.fetch_timeout)),
        )


@dataclass(frozen=True)
class DecodedImage:
    width: int
    height: int
    rgb: bytes  # width * height * 3 bytes, row by row


class ImageInputError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def load_image(url: str, param: str, limits: ImageLimits) -> DecodedImage:
    """The image at `url` (a data URL, or an http(s) URL when allowed), decoded."""
    if url.startswith("data:"):
        data = _data_url(url, param, limits)
    elif urlsplit(url).scheme in ("http", "https"):
        if not limits.fetch_urls:
            raise ImageInputError(param, "Image URLs are not fetched by this server; send the image as a "
                                         "base64 data URL (data:image/png;base64,...).")
        data = _fetch(url, param, limits)
    else:
        raise ImageInputError(param, "An image URL must be a data: URL or an http(s) URL.")
    return _decode(data, param, limits)


def _data_url(url: str, param: str, limits: ImageLimits) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageInputError(param, "A data URL image must be base64: data:image/<type>;base64,<data>.")
    if len(payload) > (limits.max_bytes * 4) // 3 + 4:
        raise ImageInputError(param, f"The image is larger than {limits.max_bytes} bytes.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(param, "The data URL's base64 data is not valid.") from None


def _fetch(url: str, param: str, limits: ImageLimits) -> bytes:
    with httpx.Client(timeout=limits.fetch_timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            _check_host(url, param)
            try:
                with client.stream("GET", url, headers={"accept": "image/*"}) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise ImageInputError(param, f"Fetching the image failed: HTTP {response.status_code}.")
                    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
                    if not kind.startswith("image/"):
                        raise ImageInputError(param, f"The URL is not an image (content type {kind or 'none'!r}).")
                    return _read_capped(response, param, limits.max_bytes)
            except httpx.HTTPError as exc:
                raise ImageInputError(param, f"Fetching the image failed: {type(exc).__name__}.") from None
    raise ImageInputError(param, f"Fetching the image took more than {MAX_REDIRECTS} redirects.")


def _check_host(url: str, param: str) -> None:
    """Every address `url`'s host resolves to must be a public one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageInputError(param, "An image URL must be an http(s) URL with a host.")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise ImageInputError(param, "The image URL's host cannot be resolved.") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise ImageInputError(param, "Image URLs may not point at this machine or a private network.")


def _read_capped(response: httpx.Response, param: str, cap: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise ImageInputError(param, f"The image is larger than {cap} bytes.")
    body = bytearray()
    for piece in response.iter_bytes():
        body += piece
        if len(body) > cap:
            raise ImageInputError(param, f"The image is larger than {cap} bytes.")
    return bytes(body)


def _decode(data: bytes, param: str, limits: ImageLimits) -> DecodedImage:
    if len(data) > limits.max_bytes:
        raise ImageInputError(param, f"The image is larger than {limits.max_bytes} bytes.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise ImageInputError(param, f"Image format {image.format} is not supported; send PNG, JPEG, "
                                             "WEBP or GIF.")
            if image.width * image.height > limits.max_pixels:
                raise ImageInputError(param, f"The image has more than {limits.max_pixels} pixels.")
            rgb = image.convert("RGB")  # a GIF's first frame
            return DecodedImage(rgb.width, rgb.height, rgb.tobytes())
    except ImageInputError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError):
        raise ImageInputError(param, "The image cannot be decoded.") from None
