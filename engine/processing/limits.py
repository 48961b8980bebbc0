"""Request limits and their checks: ``InputError`` (a bad request; the message starts with the field name),
``PreprocessLimits`` (what preprocessing enforces before the engine sees a request) and
``validate_sampling`` (the sampling fields' ranges, named as the ensemble's inputs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import EngineConfig, EngineDir


class InputError(ValueError):
    """A bad request; the message starts with the field name."""


@dataclass(frozen=True)
class PreprocessLimits:
    """Request limits enforced before the engine sees a request."""

    # The first three and enable_thinking are the engine's (EngineConfig); the rest are the request's own.
    max_seq_len: int = EngineConfig.max_model_len  # prompt + output tokens; leaves room for one output token
    max_output_tokens: int = 4096  # largest max_tokens a request may ask for
    max_images_per_request: int = EngineConfig.max_images_per_request  # most images in one request
    max_image_tokens_per_request: int = EngineConfig.max_image_tokens_per_request  # LLM image tokens
    max_image_bytes: int = 10 * 1024 * 1024  # encoded size of one image
    max_image_pixels: int = 8192 * 8192  # width x height of one input image (read from the header)
    min_image_pixels: int = 1  # width x height of one input image
    max_stop_words: int = 16  # most stop strings in one request
    enable_thinking: bool = EngineConfig.enable_thinking  # default of the chat template's thinking switch

    def __post_init__(self) -> None:
        for name in (
            "max_seq_len",
            "max_output_tokens",
            "max_image_bytes",
            "max_image_pixels",
            "min_image_pixels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {value!r} must be an integer >= 1")
        for name in ("max_images_per_request", "max_image_tokens_per_request", "max_stop_words"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: {value!r} must be an integer >= 0")
        if self.min_image_pixels > self.max_image_pixels:
            raise ValueError(
                f"min_image_pixels: {self.min_image_pixels} must be <= max_image_pixels {self.max_image_pixels}"
            )

    @classmethod
    def from_engine_dir(cls, engine_dir: str | Path | EngineDir) -> PreprocessLimits:
        """Limits of an engine directory: its "preprocess" section, and the engine's own limits from its
        EngineConfig (max_model_len, images per request, image tokens per request, thinking default)."""
        d = engine_dir if isinstance(engine_dir, EngineDir) else EngineDir.open(engine_dir)
        engine = d.engine_config()
        values = d.preprocess
        values.setdefault("max_seq_len", engine.max_model_len)
        values.setdefault("max_images_per_request", engine.max_images_per_request)
        values.setdefault("max_image_tokens_per_request", engine.max_image_tokens_per_request)
        values.setdefault("enable_thinking", engine.enable_thinking)
        values.setdefault("max_output_tokens", max(1, int(values["max_seq_len"]) - 1))
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PreprocessLimits:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown preprocessing limit (known: {sorted(known)})")
        return cls(**values)


def validate_sampling(
    *,
    max_tokens: int,
    limits: PreprocessLimits,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    min_tokens: int | None = None,
    seed: int | None = None,
) -> None:
    """Raise InputError naming the first bad sampling field (ensemble input names) and its limit."""

    def bad(name: str, value: Any, limit: str) -> InputError:
        return InputError(f"{name}: {value!r} is out of range ({limit})")

    if max_tokens < 1:
        raise bad("max_tokens", max_tokens, "must be >= 1")
    if max_tokens > limits.max_output_tokens:
        raise InputError(
            f"max_tokens: {max_tokens} is over the limit of {limits.max_output_tokens} (max_output_tokens)"
        )
    if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
        raise bad("temperature", temperature, "must be finite and >= 0; 0 is greedy")
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise bad("top_p", top_p, "must be in (0, 1]")
    if top_k is not None and top_k < 0:
        raise bad("top_k", top_k, "must be >= 0; 0 turns it off")
    if repetition_penalty is not None and not (
        math.isfinite(repetition_penalty) and 0.0 < repetition_penalty <= 2.0
    ):
        raise bad("repetition_penalty", repetition_penalty, "must be in (0, 2]")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and not (math.isfinite(value) and -2.0 <= value <= 2.0):
            raise bad(name, value, "must be in [-2, 2]")
    if min_tokens is not None and not 0 <= min_tokens <= max_tokens:
        raise bad("min_tokens", min_tokens, f"must be in [0, max_tokens={max_tokens}]")
    if seed is not None and not 0 <= seed < 2**64:
        raise bad("seed", seed, "must be in [0, 2**64)")
