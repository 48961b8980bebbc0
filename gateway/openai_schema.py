"""OpenAI chat-completions shapes: request parsing/validation, responses, stream chunks, errors.

``parse_chat_request(body, config)`` turns the JSON body of ``POST /v1/chat/completions`` into a
:class:`ChatRequest` or raises :class:`ApiError` (status + OpenAI error body). Image parts
(``image_url``: a ``data:`` URI, or an http(s) URL when ``allow_image_urls``) become
``{"type": "image"}`` parts of the ensemble's ``messages`` input, in order; their bytes are
fetched/decoded later (:mod:`gateway.images`). Reasoning is returned as ``reasoning_content``
(``include_reasoning: false`` leaves it out); GLM's box markers are stripped from answers.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from .config import GatewayConfig

ROLES = ("system", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImageRef:
    """One image of a request: where it came from (param path) and its URL / data URI."""

    param: str  # e.g. messages[0].content[1].image_url
    url: str


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # ensemble shape: text parts and {"type": "image"} parts
    images: list[ImageRef]
    prompt: str  # the last user text, sent as text_input
    max_tokens: int
    n: int = 1  # answers to the same request (choices), each its own engine request
    stream: bool = False
    include_usage: bool = False
    include_reasoning: bool = True  # False: reasoning_content is left out of the answer
    sampling: dict[str, Any] = field(default_factory=dict)  # glmv_client sampling kwargs
    tools: list[dict[str, Any]] = field(default_factory=list)  # parse GLM tool calls out of the answer
    wants_logprobs: bool = False

    @property
    def is_deterministic(self) -> bool:
        """Greedy or seeded: the same request gives the same answer, so it may be cached."""
        return self.sampling.get("temperature") == 0 or self.sampling.get("seed") is not None


#: The body fields this server reads (each checked here or in gateway.structured).
BODY_FIELDS = frozenset(
    (
        "model", "messages", "n", "max_tokens", "max_completion_tokens", "stream", "stream_options",
        "include_reasoning", "temperature", "top_p", "presence_penalty", "frequency_penalty",
        "repetition_penalty", "top_k", "seed", "min_tokens", "stop", "chat_template_kwargs",
        "enable_thinking", "response_format", "logprobs", "top_logprobs", "tools", "tool_choice",
    )
)  # fmt: skip
#: Fields OpenAI clients send that change nothing in an answer here, with the values that mean so (any
#: other value asks for something this server does not do).
NEUTRAL_FIELDS: dict[str, tuple[str, Any]] = {
    "user": ("a string (the caller's own label of its end user)", lambda v: isinstance(v, str)),
    "store": ("false (completions are not stored)", lambda v: v is False),
    "metadata": ("an object (kept only with store, which is false)", lambda v: isinstance(v, dict)),
    "service_tier": ('"auto" or "default"', lambda v: v in ("auto", "default")),
    "parallel_tool_calls": ("true (an answer may call several tools)", lambda v: v is True),
    "logit_bias": ("{} (no token biases)", lambda v: v == {}),
    "modalities": ('["text"]', lambda v: v == ["text"]),
}
#: What to use instead, for fields other servers take.
FIELD_HINTS = {
    "functions": "use 'tools'",
    "function_call": "use 'tool_choice'",
    "reasoning_effort": "use chat_template_kwargs.enable_thinking (true or false)",
    "ignore_eos": "use 'min_tokens'",
    "max_new_tokens": "use 'max_tokens'",
}
#: Message fields read (role, content, tool_calls) or that change nothing in the prompt: a tool result's
#: tool_call_id (GLM's template pairs results with calls by order) and an answer's reasoning sent back as
#: history (the template leaves it out of earlier turns); the SDK's other extras only empty.
MESSAGE_FIELDS = frozenset(("role", "content", "tool_calls", "tool_call_id", "reasoning_content"))
MESSAGE_NEUTRAL_FIELDS: dict[str, tuple[str, Any]] = {"annotations": ("[] (no citations)", lambda v: v == [])}
MESSAGE_HINTS = {
    "name": "GLM-4.6V's chat template has no participant names",
    "function_call": "use 'tool_calls'",
}
#: chat_template_kwargs keys GLM-4.6V's chat template reads.
TEMPLATE_KWARGS = ("enable_thinking",)
#: image_url.detail values that are what the image processor does (it keeps the image's detail up to its
#: pixel limit; there is no low-detail mode).
IMAGE_DETAILS = ("auto", "high")


def _refuse_unsupported(
    fields: dict[str, Any],
    known: frozenset[str],
    neutral: dict[str, tuple[str, Any]],
    hints: dict[str, str],
    where: str = "",
) -> None:
    """A 400 naming the first of ``fields`` (in their order) this server would otherwise ignore: not
    ``known``, and not one of ``neutral`` with its neutral value; a null is a field not given. ``where``:
    the fields' place in the body (``messages[2].``)."""
    for key, value in fields.items():
        if key in known or value is None:
            continue
        param = f"{where}{key}"
        rule = neutral.get(key)
        if rule is None:
            hint = f"; {hints[key]}" if key in hints else ""
            message = f"'{param}' is not supported by this server{hint}."
        elif rule[1](value):
            continue
        else:
            message = f"'{param}' is supported only as {rule[0]}, got {value!r}."
        raise ApiError(400, message, param=param, code="unsupported_parameter")


def parse_chat_request(body: Any, config: GatewayConfig) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    _refuse_unsupported(body, BODY_FIELDS, NEUTRAL_FIELDS, FIELD_HINTS)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string.", param="model")
    if model != config.served_model_name:
        raise ApiError(
            404,
            f"The model '{model}' does not exist; this server serves '{config.served_model_name}'.",
            param="model",
            code="model_not_found",
        )
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list) or not raw_messages:
        raise ApiError(400, "'messages' must be a non-empty array.", param="messages")
    messages, images, prompt = _convert_messages(raw_messages)
    if len(images) > config.max_images_per_request:
        raise ApiError(
            400,
            f"{len(images)} images in one request, over the limit of {config.max_images_per_request} "
            "(max_images_per_request).",
            param="messages",
            code="too_many_images",
        )

    n = body.get("n", 1)
    _check_int(n, "n")
    if not 1 <= n <= config.max_choices:
        raise ApiError(
            400, f"n must be between 1 and {config.max_choices} (max_choices), got {n}.", param="n"
        )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = config.max_tokens_default
    _check_int(max_tokens, "max_tokens" if "max_completion_tokens" not in body else "max_completion_tokens")
    if not 1 <= max_tokens <= config.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens must be between 1 and {config.max_tokens_limit} (max_tokens_limit), got {max_tokens}.",
            param="max_tokens",
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean.", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true.", param="stream_options")
    stream_options = stream_options or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
    for key in stream_options:
        if key != "include_usage":
            raise ApiError(
                400,
                f"stream_options.{key} is not supported by this server; it takes include_usage.",
                param=f"stream_options.{key}",
                code="unsupported_parameter",
            )
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(
            400, "stream_options.include_usage must be a boolean.", param="stream_options.include_usage"
        )
    include_reasoning = body.get("include_reasoning", True)
    if not isinstance(include_reasoning, bool):
        raise ApiError(400, "'include_reasoning' must be a boolean.", param="include_reasoning")

    sampling: dict[str, Any] = {}
    _number(body, "temperature", sampling, 0.0, 2.0)
    _number(body, "top_p", sampling, 0.0, 1.0, low_open=True)
    _number(body, "presence_penalty", sampling, -2.0, 2.0)
    _number(body, "frequency_penalty", sampling, -2.0, 2.0)
    _number(body, "repetition_penalty", sampling, 0.0, None, low_open=True)
    for name in ("top_k", "seed", "min_tokens"):
        if body.get(name) is not None:
            _check_int(body[name], name)
            if body[name] < 0 or (name == "seed" and body[name] >= 2**64):
                raise ApiError(400, f"'{name}' is out of range: {body[name]}.", param=name)
            sampling[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise ApiError(400, "'stop' must be a non-empty string or an array of them.", param="stop")
        if len(stop) > 16:
            raise ApiError(400, f"At most 16 stop strings, got {len(stop)}.", param="stop")
        if stop:
            sampling["stop"] = stop
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "'chat_template_kwargs' must be an object.", param="chat_template_kwargs")
    for key in kwargs:
        if key not in TEMPLATE_KWARGS:
            raise ApiError(
                400,
                f"chat_template_kwargs.{key} is not read by GLM-4.6V's chat template; it reads "
                f"{', '.join(TEMPLATE_KWARGS)}.",
                param=f"chat_template_kwargs.{key}",
                code="unsupported_parameter",
            )
    thinking = kwargs.get("enable_thinking", body.get("enable_thinking"))
    if thinking is not None:
        if not isinstance(thinking, bool):
            raise ApiError(
                400, "'enable_thinking' must be a boolean.", param="chat_template_kwargs.enable_thinking"
            )
        sampling["enable_thinking"] = thinking
    from .structured import parse_structured

    structured = parse_structured(body)
    sampling.update(structured.client_kwargs)
    if "guide_type" in sampling and thinking:
        raise ApiError(
            400,
            "'enable_thinking' must be false with response_format or a required tool_choice.",
            param="chat_template_kwargs.enable_thinking",
        )
    return ChatRequest(
        model=model,
        messages=messages,
        images=images,
        prompt=prompt,
        max_tokens=max_tokens,
        n=n,
        stream=stream,
        include_usage=include_usage,
        include_reasoning=include_reasoning,
        sampling=sampling,
        tools=structured.tools,
        wants_logprobs=structured.wants_logprobs,
    )


def _convert_messages(raw: list[Any]) -> tuple[list[dict[str, Any]], list[ImageRef], str]:
    messages: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    prompt = ""
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise ApiError(400, f"messages[{i}] must be an object.", param=f"messages[{i}]")
        _refuse_unsupported(msg, MESSAGE_FIELDS, MESSAGE_NEUTRAL_FIELDS, MESSAGE_HINTS, f"messages[{i}].")
        role = msg.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}.",
                param=f"messages[{i}].role",
            )
        content = msg.get("content")
        if content is None and (role == "assistant" and msg.get("tool_calls")):
            content = ""
        if role == "tool" or msg.get("tool_calls"):
            if not isinstance(content, str):
                raise ApiError(
                    400, f"messages[{i}].content must be a string.", param=f"messages[{i}].content"
                )
            message = {"role": role, "content": content}
            if msg.get("tool_calls"):
                message["tool_calls"] = msg["tool_calls"]
            messages.append(message)
            texts = [content]
        elif isinstance(content, str):
            messages.append({"role": role, "content": content})
            texts = [content]
        elif isinstance(content, list):
            parts: list[dict[str, Any]] = []
            texts = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                    texts.append(part["text"])
                elif kind == "image_url":
                    ref = part.get("image_url")
                    url = ref.get("url") if isinstance(ref, dict) else ref
                    if not isinstance(url, str) or not url:
                        raise ApiError(
                            400, f"{param}.image_url.url must be a string.", param=f"{param}.image_url"
                        )
                    detail = ref.get("detail") if isinstance(ref, dict) else None
                    if detail is not None and detail not in IMAGE_DETAILS:
                        raise ApiError(
                            400,
                            f"{param}.image_url.detail {detail!r} is not supported: images keep their "
                            f"detail up to the processor's pixel limit ({' or '.join(IMAGE_DETAILS)}).",
                            param=f"{param}.image_url.detail",
                            code="unsupported_parameter",
                        )
                    if role != "user":
                        raise ApiError(
                            400, f"{param}: images are only accepted in user messages.", param=param
                        )
                    images.append(ImageRef(param=f"{param}.image_url", url=url))
                    parts.append({"type": "image"})
                else:
                    raise ApiError(
                        400,
                        f"{param} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', 'image_url': ...}}.",
                        param=param,
                    )
            messages.append({"role": role, "content": parts})
        else:
            raise ApiError(
                400,
                f"messages[{i}].content must be a string or an array of parts.",
                param=f"messages[{i}].content",
            )
        if role == "user":
            prompt = "\n".join(texts)
    if not any(m["role"] == "user" for m in messages):
        raise ApiError(400, "'messages' must contain at least one user message.", param="messages")
    return messages, images, prompt


def _check_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(400, f"'{name}' must be an integer, got {value!r}.", param=name)


def _number(
    body: dict[str, Any],
    name: str,
    out: dict[str, Any],
    low: float,
    high: float | None,
    *,
    low_open: bool = False,
) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ApiError(400, f"'{name}' must be a number, got {value!r}.", param=name)
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        if high is None:
            bound = f"> {low}" if low_open else f">= {low}"
        raise ApiError(400, f"'{name}' must be in {bound}, got {value}.", param=name)
    out[name] = float(value)


# -- responses ------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason_for(reason: str) -> str:
    """OpenAI's finish_reason for the engine's (stop / length / abort)."""
    return reason if reason in ("stop", "length", "content_filter") else "stop"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI ``usage``; ``prompt_tokens_details.cached_tokens``: prompt tokens from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def choice_body(
    index: int,
    text: str,
    reasoning: str,
    finish_reason: str,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One choice of a ``chat.completion``; ``tool_calls``: parsed calls (finish_reason becomes
    "tool_calls"); ``logprobs``: content items."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["content"] = text or None
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "finish_reason": "tool_calls" if tool_calls else finish_reason_for(finish_reason),
        "logprobs": None if logprobs is None else {"content": logprobs},
    }


def completion_body(
    completion_id: str,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any],
    created: int | None = None,
) -> dict[str, Any]:
    """A ``chat.completion`` of ``choices`` (`choice_body`'s, in index order)."""
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage,
    }


def chunk_body(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: dict[str, int] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One ``chat.completion.chunk`` of choice ``index``; ``delta=None`` gives the usage-only chunk (no
    choices)."""
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [
            {
                "index": index,
                "delta": delta,
                "finish_reason": None
                if finish_reason is None
                else finish_reason
                if finish_reason == "tool_calls"
                else finish_reason_for(finish_reason),
                "logprobs": None if logprobs is None else {"content": logprobs},
            }
        ],
    }
    if usage is not None:
        body["usage"] = usage
    return body
