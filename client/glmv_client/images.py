"""Turn the image forms users hold into the encoded file bytes the ensemble's ``image_input`` takes.

Accepted: a filesystem path (``str`` / ``os.PathLike``), encoded file bytes (``bytes``,
``bytearray``, ``memoryview``), a ``data:`` URI string, a ``PIL.Image.Image`` and a ``numpy``
``uint8`` array (``[H, W]``, ``[H, W, 1|3|4]``). PIL images and arrays are encoded as PNG.
The byte cap is checked on the encoded bytes, before anything is sent, with the same message
shape as the server (``images[1]: image is N bytes, over the limit of M bytes (max_image_bytes)``).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, Union

from .errors import InvalidRequestError

ImageLike = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]

#: Magic numbers of the formats the server decodes.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format of encoded bytes (png, jpeg, gif, bmp, webp), or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def decode_data_uri(uri: str, field: str = "image") -> bytes:
    """The bytes of a base64 ``data:`` URI (``data:image/png;base64,...``)."""
    header, sep, payload = uri.partition(",")
    if not sep or not header.startswith("data:"):
        raise InvalidRequestError(field, "data URI has no ',' separating header and payload")
    if not header.endswith(";base64"):
        raise InvalidRequestError(field, "data URI must be base64-encoded (data:image/...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError(field, f"data URI payload is not valid base64 ({exc})") from None


def to_image_bytes(
    image: ImageLike, *, field: str = "images[0]", max_image_bytes: int | None = None
) -> bytes:
    """Encoded image file bytes for one image, checked for format and size."""
    data = _encode(image, field)
    if max_image_bytes is not None and len(data) > max_image_bytes:
        raise InvalidRequestError(
            field, f"image is {len(data)} bytes, over the limit of {max_image_bytes} bytes (max_image_bytes)"
        )
    if sniff_format(data) is None:
        raise InvalidRequestError(field, "not a PNG, JPEG, WebP, BMP or GIF file")
    return data


def to_data_uri(data: bytes) -> str:
    """A ``data:`` URI for encoded image bytes."""
    mime = {"jpeg": "image/jpeg", "gif": "image/gif", "bmp": "image/bmp", "webp": "image/webp"}
    kind = mime.get(sniff_format(data) or "", "image/png")
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _encode(image: ImageLike, field: str) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, str) and image.startswith("data:"):
        return decode_data_uri(image, field)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise InvalidRequestError(field, f"cannot read image file {path!r}: {exc.strerror}") from None
    type_name = f"{type(image).__module__}.{type(image).__qualname__}"
    if type_name.startswith("numpy."):
        return _png_from_array(image, field)
    if hasattr(image, "save") and hasattr(image, "mode"):  # PIL.Image.Image
        return _png_from_pil(image)
    raise InvalidRequestError(
        field,
        f"unsupported image type {type_name}: use a path, bytes, a data URI, a PIL image or a numpy array",
    )


def _png_from_pil(image: Any) -> bytes:
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _png_from_array(array: Any, field: str) -> bytes:
    import numpy as np
    from PIL import Image

    if array.dtype != np.uint8:
        raise InvalidRequestError(
            field, f"numpy image must be uint8 [H, W] or [H, W, C], got dtype {array.dtype}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidRequestError(
            field, f"numpy image must be [H, W] or [H, W, 1|3|4], got shape {array.shape}"
        )
    return _png_from_pil(Image.fromarray(np.ascontiguousarray(array)))
