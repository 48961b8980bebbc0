"""Asynchronous streaming clients that time one request each (used by ``benchmarks.run``).

* :class:`TritonGrpcTarget` — the ``ensemble`` model over gRPC ``ModelStreamInfer`` (``tritonclient.grpc.aio``),
  using the tensor contract of docs/DESIGN.md directly (no glmv_client), so it measures Triton itself.
* :class:`OpenAITarget` — ``POST /v1/chat/completions`` with ``stream: true`` through the gateway (SSE).
* :class:`TritonHttpTarget` — Triton's HTTP ``generate_stream`` endpoint (SSE); needs no tritonclient.

``send(sample, params)`` never raises: failures come back as a RequestRecord with ``error`` set, the
message being the server's (a Triton error message names the bad field, see DESIGN.md).

Guided requests (``RequestParams.guide_type`` / ``guide``) go as the ensemble's ``guided_decoding_guide_type``
/ ``guided_decoding_guide`` inputs (Triton targets) or as ``response_format`` (gateway: ``json_schema`` and
``json`` only); ``keep_text`` keeps each answer's text in ``RequestRecord.text``.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import uuid
from dataclasses import dataclass

import numpy as np

from benchmarks.corpus import Sample
from benchmarks.metrics import RequestRecord, StreamTimer

MAX_STREAMS_PER_CHANNEL = 32  # spread many concurrent streams over several HTTP/2 connections


@dataclass(frozen=True)
class RequestParams:
    """Sampling settings sent with every request."""

    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = 0
    ignore_eos: bool = True  # min_tokens = max_tokens, so every answer has the same length
    enable_thinking: bool = False
    timeout_s: float = 600.0
    guide_type: str | None = None
    """Guided decoding: json | json_schema | regex | ebnf_grammar (None: free text)."""
    guide: str = ""
    """The JSON schema (as JSON text), regex or grammar of ``guide_type``."""
    keep_text: bool = False
    """Keep the answer's text in ``RequestRecord.text`` (to check what a guided answer holds)."""
    lean_stream: bool = True
    """Triton targets: ask for lean streamed responses (between a stream's first and last only what changed),
    as glmv_client and the gateway do."""

    def __post_init__(self) -> None:
        if self.guide_type and self.ignore_eos:
            # the server refuses min_tokens with a grammar: the grammar decides where the answer ends
            raise ValueError(
                "ignore_eos: must be False with guide_type (min_tokens is refused with a grammar)"
            )


def image_mime(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    return "application/octet-stream"


def triton_inputs(sample: Sample, params: RequestParams, grpc_module) -> list:
    """The ensemble's input tensors for one request (``grpc_module`` is tritonclient.grpc)."""

    def tensor(name: str, dtype: str, array: np.ndarray):
        t = grpc_module.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    prompt = ("messages", sample.messages) if sample.messages else ("text_input", sample.question)
    inputs = [
        tensor(prompt[0], "BYTES", np.array([prompt[1].encode()], dtype=np.object_)),
        tensor("max_tokens", "INT32", np.array([params.max_tokens], dtype=np.int32)),
        tensor("temperature", "FP32", np.array([params.temperature], dtype=np.float32)),
        tensor("enable_thinking", "BOOL", np.array([params.enable_thinking], dtype=bool)),
        tensor("stream", "BOOL", np.array([True], dtype=bool)),
    ]
    if params.lean_stream:
        inputs.append(tensor("lean_stream", "BOOL", np.array([True], dtype=bool)))
    if sample.images:
        inputs.append(tensor("image_input", "BYTES", np.array(list(sample.images), dtype=np.object_)))
    if params.seed is not None:
        inputs.append(tensor("seed", "UINT64", np.array([params.seed], dtype=np.uint64)))
    if params.ignore_eos:
        inputs.append(tensor("min_tokens", "INT32", np.array([params.max_tokens], dtype=np.int32)))
    if params.guide_type:
        guide_type = np.array([params.guide_type.encode()], dtype=np.object_)
        inputs.append(tensor("guided_decoding_guide_type", "BYTES", guide_type))
        inputs.append(
            tensor("guided_decoding_guide", "BYTES", np.array([params.guide.encode()], dtype=np.object_))
        )
    return inputs


def _scalar(result, name: str):
    """First element of an output tensor, or None when the response lacks it."""
    try:
        array = result.as_numpy(name)
    except Exception:  # tritonclient raises on unknown names in some versions
        return None
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value.item()


class TritonGrpcTarget:
    """Streams requests to the ensemble over gRPC; one bidirectional stream per request."""

    name = "triton"

    def __init__(self, url: str, model: str = "ensemble", concurrency: int = 1) -> None:
        import tritonclient.grpc as grpc_module
        import tritonclient.grpc.aio as grpc_aio

        self._grpc = grpc_module
        self.url, self.model = url, model
        num_channels = max(1, -(-concurrency // MAX_STREAMS_PER_CHANNEL))
        self._clients = [grpc_aio.InferenceServerClient(url) for _ in range(num_channels)]
        self._next_client = itertools.cycle(self._clients)

    async def send(self, sample: Sample, params: RequestParams) -> RequestRecord:
        timer = StreamTimer()
        try:
            return await asyncio.wait_for(self._stream(timer, sample, params), params.timeout_s)
        except asyncio.TimeoutError:
            return timer.fail(f"timeout: no final response within {params.timeout_s:.0f} s")
        except Exception as exc:  # the error is the measurement
            return timer.fail(f"{type(exc).__name__}: {exc}")

    async def _stream(self, timer: StreamTimer, sample: Sample, params: RequestParams) -> RequestRecord:
        done = asyncio.Event()
        request = {
            "model_name": self.model,
            "inputs": triton_inputs(sample, params, self._grpc),
            "request_id": uuid.uuid4().hex[:16],
        }

        async def one_request():
            yield request
            await done.wait()  # keep the stream open until the final response is in

        stream = next(self._next_client).stream_infer(one_request())
        try:
            async for result, error in stream:
                if error is not None:
                    return timer.fail(str(error))
                count = _scalar(result, "num_output_tokens")
                if params.keep_text:
                    timer.record.text += _scalar(result, "text_output") or ""
                last_ns = _scalar(result, "last_token_time_ns")
                if count is None:  # no counts: one token per response with text
                    text = (_scalar(result, "text_output") or "") + (
                        _scalar(result, "reasoning_output") or ""
                    )
                    timer.tokens(new=1 if text else 0, server_last_ns=last_ns)
                else:
                    timer.tokens(int(count), server_last_ns=last_ns)
                finish_reason = _scalar(result, "finish_reason")
                if finish_reason:
                    timer.record.num_input_tokens = _scalar(result, "num_input_tokens")
                    timer.record.num_cached_tokens = _scalar(result, "num_cached_tokens")
                    timer.server_times(
                        _scalar(result, "arrival_time_ns"), _scalar(result, "first_token_time_ns")
                    )
                    return timer.finish(finish_reason, None if count is None else int(count))
            return timer.fail("stream closed before a response with a finish_reason")
        finally:
            done.set()
            stream.cancel()

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


def _data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode()}"


async def _iter_sse(response):
    """Yields the JSON payload of each ``data:`` line until ``[DONE]``."""
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        yield json.loads(data)


class OpenAITarget:
    """Streams chat completions through the OpenAI-compatible gateway (SSE)."""

    name = "openai"

    def __init__(
        self, url: str, model: str | None = None, concurrency: int = 1, api_key: str | None = None
    ) -> None:
        self.url = url if url.startswith("http") else f"http://{url}"
        self.url = self.url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = None
        self._request_counter = itertools.count()

    async def _get_session(self):
        import aiohttp

        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=timeout, headers=self._headers
            )
            if self.model is None:
                self.model = await self._first_model()
        return self._session

    async def _first_model(self) -> str:
        try:
            async with self._session.get(f"{self.url}/v1/models") as resp:
                data = await resp.json()
                return data["data"][0]["id"]
        except Exception:
            return "glm-4.6v-flash"

    def payload(self, sample: Sample, params: RequestParams) -> dict:
        content = [{"type": "image_url", "image_url": {"url": _data_uri(img)}} for img in sample.images]
        content.append({"type": "text", "text": sample.question})
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": params.enable_thinking},
        }
        if params.seed is not None:
            # A new seed per request: the gateway's exact-match cache (temperature 0 or a seed) must never
            # answer a benchmark request; greedy answers do not depend on the seed.
            body["seed"] = params.seed + next(self._request_counter)
        if params.ignore_eos:
            body["min_tokens"] = params.max_tokens
        if params.guide_type == "json_schema":
            schema = json.loads(params.guide)
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": str(schema.get("title") or "answer"),
                    "schema": schema,
                    "strict": True,
                },
            }
        elif params.guide_type == "json":
            body["response_format"] = {"type": "json_object"}
        elif params.guide_type:
            raise ValueError(
                f"guide_type: {params.guide_type!r} has no response_format (json_schema or json)"
            )
        return body

    async def send(self, sample: Sample, params: RequestParams) -> RequestRecord:
        timer = StreamTimer()
        try:
            return await asyncio.wait_for(self._stream(timer, sample, params), params.timeout_s)
        except asyncio.TimeoutError:
            return timer.fail(f"timeout: no final chunk within {params.timeout_s:.0f} s")
        except Exception as exc:
            return timer.fail(f"{type(exc).__name__}: {exc}")

    async def _stream(self, timer: StreamTimer, sample: Sample, params: RequestParams) -> RequestRecord:
        session = await self._get_session()
        body = self.payload(sample, params)
        timer.restart()  # the model lookup is not part of the request
        async with session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                return timer.fail(f"HTTP {resp.status}: {(await resp.text())[:500]}")
            finish_reason, completion_tokens = None, None
            async for chunk in _iter_sse(resp):
                if "error" in chunk:
                    err = chunk["error"]
                    return timer.fail(err.get("message", str(err)) if isinstance(err, dict) else str(err))
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if params.keep_text:
                        timer.record.text += delta.get("content") or ""
                    if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                        timer.tokens(new=1)
                    finish_reason = choice.get("finish_reason") or finish_reason
                usage = chunk.get("usage")
                if usage:
                    completion_tokens = usage.get("completion_tokens")
                    timer.record.num_input_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    timer.record.num_cached_tokens = details.get("cached_tokens")
            if finish_reason is None:
                return timer.fail("stream ended without a finish_reason")
            return timer.finish(finish_reason, completion_tokens)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class TritonHttpTarget(OpenAITarget):
    """Triton's HTTP ``generate_stream`` endpoint (SSE); images go as base64 strings."""

    name = "triton-http"

    def __init__(self, url: str, model: str = "ensemble", concurrency: int = 1) -> None:
        super().__init__(url, model=model, concurrency=concurrency)

    async def _first_model(self) -> str:
        return self.model or "ensemble"

    def payload(self, sample: Sample, params: RequestParams) -> dict:
        body = {
            "text_input": sample.question,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "enable_thinking": params.enable_thinking,
            "stream": True,
        }
        if params.lean_stream:
            body["lean_stream"] = True
        if sample.images:
            body["image_input"] = [base64.b64encode(img).decode() for img in sample.images]
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["min_tokens"] = params.max_tokens
        if params.guide_type:
            body["guided_decoding_guide_type"] = params.guide_type
            body["guided_decoding_guide"] = params.guide
        return body

    async def _stream(self, timer: StreamTimer, sample: Sample, params: RequestParams) -> RequestRecord:
        session = await self._get_session()
        url = f"{self.url}/v2/models/{self.model}/generate_stream"
        async with session.post(url, json=self.payload(sample, params)) as resp:
            if resp.status != 200:
                return timer.fail(f"HTTP {resp.status}: {(await resp.text())[:500]}")
            async for event in _iter_sse(resp):
                if "error" in event:
                    return timer.fail(str(event["error"]))
                count = event.get("num_output_tokens")
                count = count[0] if isinstance(count, list) else count
                if params.keep_text:
                    timer.record.text += _first(event.get("text_output")) or ""
                last_ns = _first(event.get("last_token_time_ns"))
                if count is None:
                    timer.tokens(
                        new=1 if event.get("text_output") or event.get("reasoning_output") else 0,
                        server_last_ns=last_ns,
                    )
                else:
                    timer.tokens(int(count), server_last_ns=last_ns)
                finish_reason = event.get("finish_reason")
                finish_reason = finish_reason[0] if isinstance(finish_reason, list) else finish_reason
                if finish_reason:
                    timer.server_times(
                        _first(event.get("arrival_time_ns")), _first(event.get("first_token_time_ns"))
                    )
                    return timer.finish(finish_reason, None if count is None else int(count))
            return timer.fail("stream ended without a finish_reason")


def _first(value):
    return value[0] if isinstance(value, list) else value


TARGETS = {"triton": TritonGrpcTarget, "openai": OpenAITarget, "triton-http": TritonHttpTarget}


def make_target(kind: str, url: str, model: str | None, concurrency: int):
    if kind not in TARGETS:
        raise ValueError(f"target: {kind!r} is not one of {sorted(TARGETS)}")
    if kind == "openai":
        return OpenAITarget(url, model=model, concurrency=concurrency)
    return TARGETS[kind](url, model=model or "ensemble", concurrency=concurrency)
