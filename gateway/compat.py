"""The GLM-4.6V-Flash-WEB image's API, served beside the OpenAI one, so that its users can switch unchanged.

Its calls and what they become here (one image, one question, a whole answer):

- ``POST /infer`` with JSON ``{"image": <base64>, "text": <question>, "max_new_tokens": 128}`` or a
  ``multipart/form-data`` upload (``image`` = the file, ``question`` = the question) → ``{"response": <answer>}``.
  ``text`` and ``question`` are both accepted in both forms (one of them, not both); ``temperature`` and
  ``top_p`` may be added.
- ``POST /v1/chat/completions`` with ``{"image": <base64 JPEG>, "prompt": ..., "max_tokens": 256,
  "temperature": 0.7}`` (no ``model``, no ``messages``) → an OpenAI ``chat.completion`` (or its SSE
  stream with ``"stream": true``). A body with ``messages`` is an OpenAI request and goes the usual way.
- ``GET /health`` → ``{"status": "alive"}``, as ``/healthz``.

``image`` is plain base64 or a ``data:`` URI. Both routes answer through the gateway's chat pipeline
(gateway/pipeline.py, as ``app.state.answer_chat``: auth, rate limit, body cap, prompt guard, response
cache, output filter); the answer excludes the reasoning, as the seed image's did. A field that the seed
API had but this server does not support, or any other unknown field, is a 400 naming it; errors name
the seed field (``image``, ``max_new_tokens``) and have OpenAI's error shape.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .config import GatewayConfig
from .errors import read_body
from .json_body import parse_json_body
from .openai_schema import ApiError, ChatRequest, ImageRef, parse_chat_request

#: Fields of the seed image's chat body (``model`` may be given and must then name the served model).
SEED_CHAT_FIELDS = ("image", "prompt", "max_tokens", "temperature", "top_p", "stream", "model")
#: Fields of ``POST /infer`` (JSON keys or form fields).
INFER_FIELDS = ("image", "text", "question", "max_new_tokens", "temperature", "top_p")

router = APIRouter()


def is_seed_chat(body: Any) -> bool:
    """A chat body in the seed image's shape: an object with ``prompt`` or ``image`` and no ``messages``."""
    return isinstance(body, dict) and "messages" not in body and ("prompt" in body or "image" in body)


def parse_seed_chat(body: dict[str, Any], config: GatewayConfig) -> ChatRequest:
    """The seed image's ``{"image", "prompt", "max_tokens", "temperature"}`` body as a ChatRequest."""
    _refuse_unknown(body, SEED_CHAT_FIELDS)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' is required and must be a non-empty string.", param="prompt")
    openai_body = {key: body[key] for key in ("max_tokens", "temperature", "top_p", "stream") if key in body}
    openai_body["model"] = body.get("model", config.served_model_name)
    return _with_image(openai_body, prompt, body.get("image"), config)


def parse_infer(fields: dict[str, Any], config: GatewayConfig, *, is_form: bool) -> ChatRequest:
    """``POST /infer`` fields (JSON values, or form strings when ``is_form``) as a ChatRequest."""
    if not isinstance(fields, dict):
        raise ApiError(400, "The request body must be a JSON object or a multipart/form-data upload.")
    _refuse_unknown(fields, INFER_FIELDS)
    if "text" in fields and "question" in fields:
        raise ApiError(400, "Give the question as 'text' or as 'question', not both.", param="question")
    name = "text" if "text" in fields else "question"
    question = fields.get(name)
    if not isinstance(question, str) or not question:
        raise ApiError(400, "'text' (or 'question') is required and must be a non-empty string.", param=name)
    openai_body: dict[str, Any] = {"model": config.served_model_name}
    if "max_new_tokens" in fields:
        value = _form_number(fields["max_new_tokens"], "max_new_tokens", int) if is_form else None
        max_new_tokens = fields["max_new_tokens"] if value is None else value
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ApiError(
                400, f"'max_new_tokens' must be an integer, got {max_new_tokens!r}.", param="max_new_tokens"
            )
        if not 1 <= max_new_tokens <= config.max_tokens_limit:
            raise ApiError(
                400,
                f"max_new_tokens must be between 1 and {config.max_tokens_limit} (max_tokens_limit), "
                f"got {max_new_tokens}.",
                param="max_new_tokens",
            )
        openai_body["max_tokens"] = max_new_tokens
    for key in ("temperature", "top_p"):
        if key in fields:
            openai_body[key] = _form_number(fields[key], key, float) if is_form else fields[key]
    return _with_image(openai_body, question, fields.get("image"), config)


def _with_image(openai_body: dict[str, Any], text: str, image: Any, config: GatewayConfig) -> ChatRequest:
    """Validate through the OpenAI parser (one set of rules); the image keeps the seed's name ``image``."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    url = None
    if image is not None:
        url = _image_url(image)
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    openai_body["messages"] = [{"role": "user", "content": content}]
    req = parse_chat_request(openai_body, config)
    images = [] if url is None else [ImageRef(param="image", url=url)]
    return dataclasses.replace(req, images=images)


def _image_url(image: Any) -> str:
    if isinstance(image, bytes):
        return "data:application/octet-stream;base64," + base64.b64encode(image).decode()
    if not isinstance(image, str) or not image.strip():
        raise ApiError(
            400, "'image' must be a base64 string, a data: URI or an uploaded file.", param="image"
        )
    if image.startswith("data:"):
        return image
    payload = "".join(image.split())  # base64 wrapped over lines is still base64
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(
            400, f"'image' is not valid base64 ({exc}).", param="image", code="invalid_image"
        ) from None
    return "data:application/octet-stream;base64," + payload


def _refuse_unknown(fields: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in fields:
        if key not in known:
            raise ApiError(
                400,
                f"'{key}' is not supported here; the supported fields are {', '.join(known)}.",
                param=key,
                code="unsupported_parameter",
            )


def _form_number(value: Any, name: str, kind: type) -> Any:
    if not isinstance(value, str):
        raise ApiError(400, f"'{name}' must be a form field, not a file.", param=name)
    try:
        return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ApiError(400, f"'{name}' must be {noun}, got {value!r}.", param=name) from None


async def _read_form(request: Request, raw: bytes) -> dict[str, Any]:
    async def stream() -> AsyncIterator[bytes]:
        yield raw

    try:
        form = await MultiPartParser(request.headers, stream()).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"The multipart body is malformed: {exc.message}.", code="invalid_form") from None
    fields: dict[str, Any] = {}
    for key, value in form.multi_items():
        if key in fields:
            raise ApiError(400, f"'{key}' is given more than once.", param=key)
        fields[key] = await value.read() if isinstance(value, UploadFile) else value
    return fields


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "alive"}


@router.post("/infer")
async def infer(request: Request) -> Response:
    gw = request.app.state.gateway
    gw.auth.check(request.headers.get("authorization"))
    raw = await read_body(request, gw.config.max_body_bytes)
    is_form = request.headers.get("content-type", "").startswith("multipart/form-data")
    if is_form:
        fields = await _read_form(request, raw)
    else:
        fields = parse_json_body(raw)
    req = parse_infer(fields, gw.config, is_form=is_form)
    response = await request.app.state.answer_chat(request, req)
    if not isinstance(response, JSONResponse):  # 499: the client went away
        return response
    answer = json.loads(response.body)["choices"][0]["message"]["content"]
    headers = {k: v for k, v in response.headers.items() if k.startswith("x-glmv-")}
    return JSONResponse({"response": answer}, headers=headers)
