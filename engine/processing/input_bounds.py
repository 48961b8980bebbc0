"""Byte bounds on every string input of a request, checked before any decoding, parsing or tokenizing.

Contract:
- `InputBounds.from_limits(limits)` derives the bounds from the engine's `PreprocessLimits`:
  `max_text_bytes = TEXT_BYTES_PER_TOKEN x max_seq_len` for each of `text_input`, `messages`, `tools`,
  `guided_decoding_guide` and for all `stop_words` together (no text longer than that can fit the context:
  our tokenizers' tokens average 3-4 bytes of text); one `image_input` element may be as large as the
  base64 form of `max_image_bytes` plus a data-URI prefix (an image file itself: `max_image_bytes`, the
  limit and message of `open_image`), and there may be at most
  `max_images_per_request` of them.
- `check(name, values)` raises `InputError` whose message starts with the field, gives the size and the
  limit: `text_input: 31457280 bytes, over the limit of 131072 bytes (max_text_bytes = 16 x max_seq_len)`.
  Its cost is one `len()` per element, whatever the size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.processing.images import sniff_format
from engine.processing.limits import InputError, PreprocessLimits

__all__ = ["InputBounds", "TEXT_BYTES_PER_TOKEN"]

TEXT_BYTES_PER_TOKEN = 16
TEXT_INPUTS = ("text_input", "messages", "tools", "guided_decoding_guide", "stop_words")
DATA_URI_SLACK_BYTES = 1024  # "data:image/png;base64," and line breaks around base64


@dataclass(frozen=True)
class InputBounds:
    """Most bytes each string input may carry."""

    max_text_bytes: int
    max_image_input_bytes: int  # one image_input element: base64 of max_image_bytes + a data-URI prefix
    max_images_per_request: int
    max_image_bytes: int  # one image_input element given as the image file itself

    @classmethod
    def from_limits(cls, limits: PreprocessLimits) -> InputBounds:
        return cls(
            max_text_bytes=TEXT_BYTES_PER_TOKEN * limits.max_seq_len,
            max_image_input_bytes=-(-limits.max_image_bytes // 3) * 4 + DATA_URI_SLACK_BYTES,
            max_images_per_request=limits.max_images_per_request,
            max_image_bytes=limits.max_image_bytes,
        )

    def check(self, name: str, values: Sequence[bytes]) -> None:
        """Raise InputError when `values` (the elements of input `name`) exceed their bound."""
        if name == "image_input":
            if len(values) > self.max_images_per_request:
                raise InputError(
                    f"image_input: {len(values)} images, over the limit of {self.max_images_per_request} "
                    "(max_images_per_request)"
                )
            for i, value in enumerate(values):
                if len(value) > self.max_image_bytes and sniff_format(value[:16]) is not None:
                    raise InputError(
                        f"image_input[{i}]: image is {len(value)} bytes, over the limit of "
                        f"{self.max_image_bytes} bytes (max_image_bytes)"
                    )
                if len(value) > self.max_image_input_bytes:
                    raise InputError(
                        f"image_input[{i}]: {len(value)} bytes, over the limit of {self.max_image_input_bytes} "
                        "bytes (the base64 form of max_image_bytes)"
                    )
            return
        size = sum(len(v) for v in values)
        if size > self.max_text_bytes:
            raise InputError(
                f"{name}: {size} bytes, over the limit of {self.max_text_bytes} bytes "
                f"(max_text_bytes = {TEXT_BYTES_PER_TOKEN} x max_seq_len)"
            )
