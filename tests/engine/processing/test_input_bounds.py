"""InputBounds: byte limits derived from the engine limits, exact messages."""

from __future__ import annotations

import pytest

from engine.processing.input_bounds import InputBounds
from engine.processing.limits import InputError, PreprocessLimits


def test_bounds_follow_the_engine_limits() -> None:
    bounds = InputBounds.from_limits(
        PreprocessLimits(max_seq_len=512, max_image_bytes=300, max_images_per_request=2)
    )
    assert bounds == InputBounds(
        max_text_bytes=8192, max_image_input_bytes=400 + 1024, max_images_per_request=2, max_image_bytes=300
    )


def test_each_input_is_refused_by_its_size() -> None:
    bounds = InputBounds(
        max_text_bytes=10, max_image_input_bytes=20, max_images_per_request=2, max_image_bytes=15
    )
    bounds.check("text_input", [b"x" * 10])
    bounds.check("image_input", [b"y" * 20, b"y"])
    bounds.check("stop_words", [b"abcde", b"fghij"])
    cases = [
        ("text_input", [b"x" * 11], "text_input: 11 bytes, over the limit of 10 bytes (max_text_bytes = 16 x max_seq_len)"),
        ("messages", [b"m" * 30], "messages: 30 bytes, over the limit of 10 bytes (max_text_bytes = 16 x max_seq_len)"),
        ("stop_words", [b"abcdef", b"ghijk"], "stop_words: 11 bytes, over the limit of 10 bytes (max_text_bytes = 16 x max_seq_len)"),
        ("image_input", [b"y", b"y" * 21], "image_input[1]: 21 bytes, over the limit of 20 bytes (the base64 form of max_image_bytes)"),
        ("image_input", [b"y"] * 3, "image_input: 3 images, over the limit of 2 (max_images_per_request)"),
        ("image_input", [b"\x89PNG\r\n\x1a\n" + b"p" * 8], "image_input[0]: image is 16 bytes, over the limit of 15 bytes (max_image_bytes)"),
    ]  # fmt: skip
    for name, values, message in cases:
        with pytest.raises(InputError) as info:
            bounds.check(name, values)
        assert str(info.value) == message
