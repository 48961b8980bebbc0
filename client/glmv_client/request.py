"""One validated request and its two wire forms (gRPC tensors, HTTP generate JSON).

``build_request`` checks everything the server would reject, so a bad call fails here with an
:class:`InvalidRequestError` naming the argument instead of a round trip. ``Limits`` mirrors the
server's defaults (``max_image_bytes`` 10 MiB, ``max_images_per_request`` 8, ``max_tokens`` ≤ 4096 (``max_output_tokens``), sampling ranges);
raise them together with the server's settings.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InvalidRequestError
from .images import ImageLike, to_image_bytes

MiB = 1024 * 1024
UINT64_MAX = 2**64 - 1
GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")


@dataclass(frozen=True)
class Limits:
    """Client-side limits; keep them equal to the server's settings of the same name."""

    max_image_bytes: int = 10 * MiB  # bytes of one encoded image file
    max_images_per_request: int = 8
    max_tokens: int = 4096  # upper bound of max_tokens (the server's max_output_tokens)
    max_stop_words: int = 16
    max_temperature: float | None = None  # None: any finite value >= 0, as the server accepts
    max_message_bytes: int = 64 * MiB  # gRPC max send/receive message size
    max_num_return_sequences: int = 8  # the server's --max-num-return-sequences


@dataclass(frozen=True)
class GenerateRequest:
    """A validated ensemble request. ``None`` means "leave to the server's default"."""

    prompt: str
    images: tuple[bytes, ...] = ()
    messages: str | None = None  # JSON, OpenAI shape with {"type": "image"} parts
    max_tokens: int = 512
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    enable_thinking: bool | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    stream: bool = False
    request_id: str = ""
    tools: str | None = None  # JSON list of OpenAI function tools, for the chat template
    guide_type: str | None = None  # guided decoding: json | json_schema | regex | ebnf_grammar
    guide: str | None = None  # the schema (JSON), regex or grammar
    logprobs: int | None = None  # None: off; k: the token's logprob and the k most likely
    num_return_sequences: int = 1  # sequences of the prompt (stream only), told apart by their index
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_image_bytes(self) -> int:
        return sum(len(b) for b in self.images)


def build_request(
    images: ImageLike | Sequence[ImageLike] | None,
    prompt: str,
    *,
    limits: Limits,
    messages: Sequence[dict[str, Any]] | None = None,
    max_tokens: int = 512,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    enable_thinking: bool | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    min_tokens: int | None = None,
    stream: bool = False,
    request_id: str = "",
    tools: Sequence[dict[str, Any]] | None = None,
    guide_type: str | None = None,
    guide: str | None = None,
    logprobs: int | None = None,
    num_return_sequences: int = 1,
) -> GenerateRequest:
    """Validate the arguments of ``analyze`` / ``stream`` into a :class:`GenerateRequest`."""
    image_list = _as_image_list(images)
    if len(image_list) > limits.max_images_per_request:
        raise InvalidRequestError(
            "images",
            f"{len(image_list)} images, over the limit of {limits.max_images_per_request} "
            "(max_images_per_request)",
        )
    encoded = tuple(
        to_image_bytes(img, field=f"images[{i}]", max_image_bytes=limits.max_image_bytes)
        for i, img in enumerate(image_list)
    )
    if not isinstance(prompt, str):
        raise InvalidRequestError("prompt", f"must be a str, got {type(prompt).__name__}")
    messages_json = None
    if messages is not None:
        messages_json = _check_messages(messages, len(encoded))
    elif not prompt.strip():
        raise InvalidRequestError("prompt", "must not be empty")

    _check_int("max_tokens", max_tokens, 1, limits.max_tokens)
    _check_float("temperature", temperature, 0.0, limits.max_temperature)
    _check_float("top_p", top_p, 0.0, 1.0, low_open=True)
    _check_int("top_k", top_k, 0, None)
    _check_int("seed", seed, 0, UINT64_MAX)
    _check_float("repetition_penalty", repetition_penalty, 0.0, 2.0, low_open=True)
    _check_float("presence_penalty", presence_penalty, -2.0, 2.0)
    _check_float("frequency_penalty", frequency_penalty, -2.0, 2.0)
    _check_int("min_tokens", min_tokens, 0, max_tokens)
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise InvalidRequestError("enable_thinking", "must be a bool")
    stop_words = _check_stop(stop, limits.max_stop_words)
    _check_int("logprobs", logprobs, 0, 20)
    _check_int("num_return_sequences", num_return_sequences, 1, limits.max_num_return_sequences)
    if guide_type is not None and guide_type not in GUIDE_TYPES:
        raise InvalidRequestError("guide_type", f"{guide_type!r} must be one of {', '.join(GUIDE_TYPES)}")
    if guide is not None and guide_type is None:
        raise InvalidRequestError("guide_type", "missing: a guide needs its type")
    tools_json = None
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise InvalidRequestError("tools", "must be a list of function tools")
        tools_json = json.dumps(list(tools), ensure_ascii=False)

    req = GenerateRequest(
        prompt=prompt,
        images=encoded,
        messages=messages_json,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop_words,
        enable_thinking=enable_thinking,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        min_tokens=min_tokens,
        stream=stream,
        request_id=request_id,
        tools=tools_json,
        guide_type=guide_type,
        guide=guide,
        logprobs=logprobs,
        num_return_sequences=num_return_sequences,
    )
    # base64 in JSON and protobuf framing add overhead; 4/3 covers the worst case (HTTP).
    approx = req.num_image_bytes * 4 // 3 + len(prompt.encode()) + len(messages_json or "") + 4096
    if approx > limits.max_message_bytes:
        raise InvalidRequestError(
            "images",
            f"request is about {approx} bytes, over the limit of {limits.max_message_bytes} bytes "
            "(max_message_bytes)",
        )
    return req


def one_sequence(req: GenerateRequest) -> GenerateRequest:
    """``req`` for ``analyze``, which returns one answer: several sequences are for ``stream``."""
    if req.num_return_sequences > 1:
        raise InvalidRequestError(
            "num_return_sequences",
            f"{req.num_return_sequences}: analyze() returns one answer; stream() yields several, by index",
        )
    return req


def _as_image_list(images: Any) -> list[Any]:
    if images is None:
        return []
    if isinstance(images, (str, bytes, bytearray, memoryview)) or hasattr(images, "__fspath__"):
        return [images]
    if type(images).__module__.startswith("numpy") or (hasattr(images, "save") and hasattr(images, "mode")):
        return [images]
    if isinstance(images, Sequence) or hasattr(images, "__iter__"):
        return list(images)
    return [images]


def _check_messages(messages: Sequence[dict[str, Any]], num_images: int) -> str:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidRequestError("messages", "must be a non-empty list of {role, content} objects")
    num_image_parts = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidRequestError(f"messages[{i}]", "must be an object with 'role' and 'content'")
        if msg["role"] not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(f"messages[{i}].role", f"unknown role {msg['role']!r}")
        content = msg["content"]
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    num_image_parts += 1
                elif kind != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError(
                        f"messages[{i}].content[{j}]",
                        "must be {'type': 'text', 'text': str} or {'type': 'image'}",
                    )
        elif not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content", "must be a string or a list of parts")
    if num_image_parts != num_images:
        raise InvalidRequestError(
            "messages", f"{num_image_parts} image parts but {num_images} images were given; they must match"
        )
    return json.dumps(list(messages), ensure_ascii=False)


def _check_int(name: str, value: Any, low: int, high: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidRequestError(name, f"must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise InvalidRequestError(name, f"{value} is out of range {bound}")


def _check_float(name: str, value: Any, low: float, high: float | None, *, low_open: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise InvalidRequestError(name, f"must be a number, got {value!r}")
    if (
        not math.isfinite(value)
        or value < low
        or (low_open and value == low)
        or (high is not None and value > high)
    ):
        lo = "(" if low_open else "["
        bound = f"{lo}{low}, {high}]" if high is not None else f"{'>' if low_open else '>='} {low}"
        raise InvalidRequestError(name, f"{value} is out of range {bound}")


def _check_stop(stop: Any, max_stop_words: int) -> tuple[str, ...]:
    if stop is None:
        return ()
    words = [stop] if isinstance(stop, str) else list(stop)
    if len(words) > max_stop_words:
        raise InvalidRequestError("stop", f"{len(words)} stop strings, over the limit of {max_stop_words}")
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word:
            raise InvalidRequestError(f"stop[{i}]", "must be a non-empty string")
    return tuple(words)


def tensor_values(req: GenerateRequest) -> dict[str, np.ndarray]:
    """The ensemble's input tensors (name → numpy array with the contract's dtype and dims)."""
    t: dict[str, np.ndarray] = {
        "text_input": np.array([req.prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([req.max_tokens], dtype=np.int32),
        "stream": np.array([req.stream], dtype=bool),
    }
    if req.stream:  # responses between a stream's first and last carry only what changed (Assembler)
        t["lean_stream"] = np.array([True], dtype=bool)
    if req.messages is not None:
        t["messages"] = np.array([req.messages.encode()], dtype=np.object_)
    if req.images:
        t["image_input"] = np.array(list(req.images), dtype=np.object_)
    for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None:
            t[name] = np.array([value], dtype=np.float32)
    for name in ("top_k", "min_tokens"):
        value = getattr(req, name)
        if value is not None:
            t[name] = np.array([value], dtype=np.int32)
    if req.seed is not None:
        t["seed"] = np.array([req.seed], dtype=np.uint64)
    if req.stop:
        t["stop_words"] = np.array([w.encode() for w in req.stop], dtype=np.object_)
    if req.enable_thinking is not None:
        t["enable_thinking"] = np.array([req.enable_thinking], dtype=bool)
    for name, value in _structured_inputs(req).items():
        if isinstance(value, str):
            t[name] = np.array([value.encode()], dtype=np.object_)
        elif isinstance(value, bool):
            t[name] = np.array([value], dtype=bool)
        else:
            t[name] = np.array([value], dtype=np.int32)
    return t


def _structured_inputs(req: GenerateRequest) -> dict[str, Any]:
    """tools, guided decoding, logprobs and num_return_sequences inputs, by tensor name (only those set)."""
    values: dict[str, Any] = {}
    if req.tools is not None:
        values["tools"] = req.tools
    if req.guide_type is not None:
        values["guided_decoding_guide_type"] = req.guide_type
        values["guided_decoding_guide"] = req.guide or ""
    if req.logprobs is not None:
        values["return_log_probs"] = True
        values["top_logprobs"] = req.logprobs
    if req.num_return_sequences > 1:
        values["num_return_sequences"] = req.num_return_sequences
    return values


def generate_json(req: GenerateRequest) -> dict[str, Any]:
    """The body of ``POST /v2/models/<model>/generate[_stream]``: one key per input tensor."""
    body: dict[str, Any] = {"text_input": req.prompt, "max_tokens": req.max_tokens, "stream": req.stream}
    if req.stream:
        body["lean_stream"] = True
    if req.messages is not None:
        body["messages"] = req.messages
    if req.images:
        body["image_input"] = [base64.b64encode(b).decode("ascii") for b in req.images]
    for name in (
        "temperature",
        "top_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "top_k",
        "min_tokens",
        "seed",
        "enable_thinking",
    ):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.stop:
        body["stop_words"] = list(req.stop)
    body.update(_structured_inputs(req))
    return body
