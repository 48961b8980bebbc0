"""Image files of a request: ``decode_image_bytes`` (raw bytes, base64 or a ``data:`` URI → the file's bytes)
and ``open_image`` (size, format and header dimensions checked against ``PreprocessLimits`` before any pixel
is decoded, so a decompression bomb never is; then the first frame decoded). Formats: PNG, JPEG, WebP, BMP,
GIF. Errors are ``InputError`` naming the field (``image_input[i]``) and the limit.

A still PNG of 8-bit gray, RGB or RGBA samples without a transparency chunk (screenshots, documents) that
the caller asks for (``png_fast_if``: one kept at its size, or one the engine resizes) is decoded by libspng
(``pyspng``), about twice as fast as PIL's decoder, into the same pixels; every other file, and any PNG
libspng refuses, by PIL. (An image that PIL resizes gains nothing from it: PIL's resize needs the pixels
copied into a PIL image first.)"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.processing.limits import InputError, PreprocessLimits

try:
    import pyspng
except ImportError:  # PIL decodes every PNG
    pyspng = None

SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
MAX_ASPECT_RATIO = 200  # smart_resize refuses more
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


@dataclass(frozen=True)
class ImageInfo:
    """One validated, decoded input image."""

    image: Any  # PIL.Image.Image, loaded
    format: str  # PNG | JPEG | WEBP | BMP | GIF
    width: int
    height: int
    num_bytes: int
    file_hash: str  # sha256 hex of the file bytes (the key of the preprocessor's resize cache)
    is_decoded: bool = True  # False: only the header was read (the resize cache held the image)
    pixels: np.ndarray | None = None  # libspng's decode, uint8 [h, w] L / [h, w, 3] RGB / [h, w, 4] RGBA;
    # ``image`` is then the file's header only

    def pil_image(self) -> Any:
        """The decoded image as a PIL image."""
        if self.pixels is None:
            return self.image
        from PIL import Image

        return Image.fromarray(self.pixels)


_SPNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}  # a PNG's 8-bit colour types libspng decodes here, as PIL's modes


def decode_png_fast(img: Any, data: bytes) -> np.ndarray | None:
    """libspng's decode of ``data`` (a PNG file whose header PIL read into ``img``) when it gives the pixels
    PIL would: one frame, 8-bit gray / RGB / RGBA samples, no tRNS chunk; else None (PIL decodes it, and
    names the error of a corrupt file)."""
    if pyspng is None or img.format != "PNG" or data[12:16] != b"IHDR" or data[24] != 8:
        return None  # IHDR, the first chunk, holds the bit depth at byte 24 and the colour type at 25
    if (
        _SPNG_MODES.get(data[25]) != img.mode
        or "transparency" in img.info
        or getattr(img, "n_frames", 1) != 1
    ):
        return None
    try:
        pixels = pyspng.load(data)
    except Exception:
        return None
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (img.height, img.width):
        return None
    return pixels


def sniff_format(data: bytes) -> str | None:
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _other_image_format(data: bytes) -> str | None:
    """The format name of an image PIL knows but we do not accept (TIFF, ICO, ...), else None."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(img.format)
    except Exception:
        return None


def decode_image_bytes(raw: bytes | str, field: str) -> bytes:
    """The image file bytes of one `image_input` element: raw bytes, base64, or a `data:` URI."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if not data:
        raise InputError(f"{field}: image is empty (0 bytes)")
    if sniff_format(data) is not None:
        return data
    stripped = data.strip()
    if stripped[:5].lower() == b"data:":
        header, sep, payload = stripped.partition(b",")
        if not sep:
            raise InputError(f"{field}: data URI has no ',' before its payload")
        if not header.lower().endswith(b";base64"):
            raise InputError(f"{field}: data URI must be base64 encoded (data:image/...;base64,...)")
        stripped = payload
    try:
        decoded = base64.b64decode(b"".join(stripped.split()), validate=True)
    except (binascii.Error, ValueError):
        other = _other_image_format(data)
        if other is not None:
            raise InputError(
                f"{field}: image format {other} is not supported (PNG, JPEG, WebP, BMP, GIF)"
            ) from None
        raise InputError(
            f"{field}: not a PNG/JPEG/WebP/BMP/GIF image, nor base64 or a data: URI of one"
        ) from None
    if not decoded:
        raise InputError(f"{field}: image is empty (0 bytes after base64 decoding)")
    return decoded


def open_image(
    data: bytes,
    field: str,
    limits: PreprocessLimits,
    decode: bool = True,
    file_hash: str | None = None,
    png_fast_if: Callable[[int, int], bool] | None = None,
) -> ImageInfo:
    """Validate one image file (size, format, header dimensions) and decode it (first frame; with
    ``decode=False`` only the header is read: for a file already decoded once). ``png_fast_if(width,
    height)``: whether a PNG libspng can decode is decoded by it (None: always)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise InputError(
            f"{field}: image is {len(data)} bytes, over the limit of {limits.max_image_bytes} bytes "
            "(max_image_bytes)"
        )
    sniffed = sniff_format(data)
    if sniffed is None:
        raise InputError(
            f"{field}: unsupported or unrecognized image format (supported: PNG, JPEG, WebP, BMP, GIF)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(SUPPORTED_FORMATS))  # reads the header only
    except Image.DecompressionBombError as exc:  # PIL refuses far-too-large headers itself
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise InputError(
            f"{field}: image is {size}, over the limit of {limits.max_image_pixels} pixels (max_image_pixels)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{field}: corrupt {sniffed} image, cannot read its header ({exc})") from None
    if img.format not in SUPPORTED_FORMATS:
        raise InputError(f"{field}: image format {img.format} is not supported (PNG, JPEG, WebP, BMP, GIF)")
    width, height = img.size
    num_pixels = width * height
    if num_pixels > limits.max_image_pixels:
        raise InputError(
            f"{field}: image is {width}x{height} = {num_pixels} pixels, over the limit of "
            f"{limits.max_image_pixels} pixels (max_image_pixels)"
        )
    if num_pixels < limits.min_image_pixels or width < 1 or height < 1:
        raise InputError(
            f"{field}: image is {width}x{height} = {num_pixels} pixels, under the minimum of "
            f"{limits.min_image_pixels} pixels (min_image_pixels)"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise InputError(
            f"{field}: image is {width}x{height}, its aspect ratio "
            f"{max(width, height) / min(width, height):.1f} is over the limit of {MAX_ASPECT_RATIO}"
        )
    use_spng = decode and (png_fast_if is None or png_fast_if(width, height))
    pixels = decode_png_fast(img, data) if use_spng else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if decode and pixels is None and getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            if decode and pixels is None:
                img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise InputError(f"{field}: corrupt or truncated {img.format} image ({exc})") from None
    return ImageInfo(
        image=img,
        format=str(img.format),
        width=width,
        height=height,
        num_bytes=len(data),
        file_hash=file_hash or hashlib.sha256(data).hexdigest(),
        is_decoded=decode,
        pixels=pixels,
    )
