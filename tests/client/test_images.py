from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from glmv_client.errors import InvalidRequestError
from glmv_client.images import decode_data_uri, sniff_format, to_data_uri, to_image_bytes
from PIL import Image


def test_every_input_form_gives_the_same_png(tmp_path, png_bytes):
    path = tmp_path / "red.png"
    path.write_bytes(png_bytes)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes).decode()
    assert to_image_bytes(str(path)) == png_bytes
    assert to_image_bytes(path) == png_bytes
    assert to_image_bytes(png_bytes) == png_bytes
    assert to_image_bytes(bytearray(png_bytes)) == png_bytes
    assert to_image_bytes(memoryview(png_bytes)) == png_bytes
    assert to_image_bytes(uri) == png_bytes
    pil = Image.open(io.BytesIO(png_bytes))
    arr = np.asarray(pil)
    decoded = [np.asarray(Image.open(io.BytesIO(to_image_bytes(x)))) for x in (pil, arr)]
    assert all(np.array_equal(d, arr) for d in decoded)


def test_numpy_shapes_and_dtypes():
    gray = to_image_bytes(np.zeros((4, 5), np.uint8))
    assert Image.open(io.BytesIO(gray)).size == (5, 4)
    rgba = to_image_bytes(np.zeros((4, 5, 4), np.uint8))
    assert Image.open(io.BytesIO(rgba)).mode == "RGBA"
    with pytest.raises(InvalidRequestError, match=r"images\[2\]: numpy image must be uint8") as info:
        to_image_bytes(np.zeros((4, 5, 3), np.float32), field="images[2]")
    assert info.value.field == "images[2]"
    with pytest.raises(InvalidRequestError, match="got shape"):
        to_image_bytes(np.zeros((4, 5, 2), np.uint8))


def test_size_cap_names_the_limit(png_bytes):
    with pytest.raises(InvalidRequestError) as info:
        to_image_bytes(png_bytes, field="images[1]", max_image_bytes=10)
    assert str(info.value) == (
        f"images[1]: image is {len(png_bytes)} bytes, over the limit of 10 bytes (max_image_bytes)"
    )
    assert to_image_bytes(png_bytes, max_image_bytes=len(png_bytes)) == png_bytes


def test_bad_inputs():
    with pytest.raises(InvalidRequestError, match="not a PNG, JPEG, WebP, BMP or GIF file"):
        to_image_bytes(b"hello")
    with pytest.raises(InvalidRequestError, match="cannot read image file"):
        to_image_bytes("/nonexistent/x.png")
    with pytest.raises(InvalidRequestError, match="unsupported image type builtins.int"):
        to_image_bytes(3)
    with pytest.raises(InvalidRequestError, match="must be base64-encoded"):
        decode_data_uri("data:image/png,abc")
    with pytest.raises(InvalidRequestError, match="not valid base64"):
        decode_data_uri("data:image/png;base64,@@@")


def test_sniff_and_data_uri(png_bytes):
    assert sniff_format(png_bytes) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_format(b"GIF89a") == "gif"
    assert to_data_uri(png_bytes).startswith("data:image/png;base64,")
    assert decode_data_uri(to_data_uri(png_bytes)) == png_bytes
