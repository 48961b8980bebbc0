"""The chat pipeline: one chat request from HTTP to Triton and back, as one JSON answer or an SSE stream.

Contract:
- ``answer_chat(gw, request, parsed=None) -> Response`` answers ``POST /v1/chat/completions`` and the seed
  API's routes (which pass the ChatRequest they parsed): auth (401) → rate limit (429 + Retry-After) → body
  cap (413) → parse (400/404) → prompt guard (400 ``prompt_rejected``) → images (413/400) → response cache
  → Triton over gRPC streaming through ``glmv_client``, on the server the request's affinity key prefers
  (gateway/backends.py). A client that goes away cancels its gRPC stream,
  which cancels the request in the engine; gone before the answer, it gets 499. An error before the first
  byte is its ApiError (gateway/errors.py), after it an error event and ``[DONE]``. The request counts in
  ``glmv_gateway_requests_in_flight`` until its last byte.
- The cache-and-count step, once for both paths: ``look_up`` before Triton (deterministic requests without
  logprobs only; ``x-glmv-cache: hit|miss`` and the hit/miss counter), ``record`` after a fresh answer
  (prompt and completion token counters; stored when it finished with stop or length). A cached answer is
  replayed, never counted again.
- ``n`` > 1 choices: one ensemble request with ``num_return_sequences`` = n, preprocessed once; the server
  moves the seed by the choice's index and starts all choices together: the engine computes their images
  and prompt once (choices 1.. skip the ViT and all but the prompt's last block). Events come as
  (index, event) by the responses' sequence_index; the usage counts the prompt once (choice 0's, with its
  cached tokens) and every choice's completion tokens.
  An error of any choice ends the request. Requests with n > 1 are never answered from, or stored in, the
  response cache.
- ``ChunkWriter`` turns one choice's Delta/Finish events into SSE chunks: the role chunk first; box markers
  stripped; the output filter and tool calls hold back text across deltas; then the finish chunk (with the
  logprobs of tokens no delta carried); ``end`` gives the usage chunk (``include_usage``) and ``[DONE]``
  once every choice has finished. ``completion_from`` does the same for whole answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from glmv_client import Delta, Finish
from glmv_client.errors import GlmvError
from glmv_client.results import Result, Timings, Usage
from starlette.background import BackgroundTask

from .backends import affinity_key
from .cache import cache_key
from .compat import is_seed_chat, parse_seed_chat
from .disconnect import ClientDisconnected, unless_disconnected, wait_for_disconnect
from .errors import api_error_from, read_body
from .guard import OutputFilter
from .images import resolve_images
from .json_body import parse_json_body, sse_event
from .metrics import GatewayMetrics
from .openai_schema import (
    ApiError,
    ChatRequest,
    choice_body,
    chunk_body,
    completion_body,
    new_completion_id,
    parse_chat_request,
    usage_dict,
)
from .ratelimit import RateLimiter
from .state import Gateway
from .structured import ToolCallStream, parse_tool_calls

ENDPOINT = "/v1/chat/completions"
BOX_MARKERS = ("<|begin_of_box|>", "<|end_of_box|>")

Event = Delta | Finish | Exception  # what a stream's producer hands to its response
ChoiceEvent = tuple[int, Event]  # an event of the choice with this index


async def answer_chat(gw: Gateway, request: Request, parsed: ChatRequest | None = None) -> Response:
    """The whole answer to one chat request; ``parsed``: a request already parsed (the seed API's)."""
    gw.metrics.in_flight.inc()
    try:
        response = await _answer(gw, request, parsed)
    except BaseException:
        gw.metrics.in_flight.dec()
        raise
    if isinstance(response, StreamingResponse):
        response.background = BackgroundTask(gw.metrics.in_flight.dec)  # runs after the last byte
    else:
        gw.metrics.in_flight.dec()
    return response


async def _answer(gw: Gateway, request: Request, parsed: ChatRequest | None) -> Response:
    started = time.monotonic()
    bucket = _admit(gw, request)
    if parsed is None:
        body = parse_json_body(await read_body(request, gw.config.max_body_bytes))
        parsed = (
            parse_seed_chat(body, gw.config) if is_seed_chat(body) else parse_chat_request(body, gw.config)
        )
    req = parsed
    if req.n > 1:
        _admit_choices(gw, bucket, req.n)
    gw.guard.check(req.messages)
    assert gw.http is not None
    images = await resolve_images(req.images, gw.config, gw.http)
    lookup = await look_up(gw, req, images)
    if req.stream:
        return await _stream(gw, request, req, images, lookup, started)
    return await _complete(gw, request, req, images, lookup, started)


def _admit(gw: Gateway, request: Request) -> str:
    """Auth (401), then the rate limit (429) per API key, or per client address when the server is open;
    returns the rate limit's bucket."""
    key = gw.auth.check(request.headers.get("authorization"))
    bucket = key if key is not None else (request.client.host if request.client else "anonymous")
    _rate_limit(gw, bucket, 1, "")
    return bucket


def _admit_choices(gw: Gateway, bucket: str, n: int) -> None:
    """n choices are n requests of the rate limit: the n - 1 beyond the one taken on arrival (a 400 where
    they can never fit the burst)."""
    if gw.limiter.is_enabled and n > gw.config.rate_limit_burst:
        raise ApiError(
            400,
            f"n={n} choices count as {n} requests of the rate limit, over its burst of "
            f"{gw.config.rate_limit_burst} (rate_limit_burst).",
            param="n",
        )
    _rate_limit(gw, bucket, n - 1, f" n={n} choices count as {n} requests.")


def _rate_limit(gw: Gateway, bucket: str, cost: int, why: str) -> None:
    wait_s = gw.limiter.acquire(bucket, cost)
    if wait_s > 0:
        retry_after = RateLimiter.retry_after(wait_s)
        raise ApiError(
            429,
            f"Rate limit reached: {gw.config.rate_limit_rps:g} requests per second with bursts of "
            f"{gw.config.rate_limit_burst} (rate_limit_rps, rate_limit_burst).{why} Retry after {retry_after} s.",
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after)},
        )


def triton_kwargs(req: ChatRequest) -> dict[str, Any]:
    """glmv_client keyword arguments of a request, after its images and prompt: messages, limits, sampling,
    and ``num_return_sequences`` for n > 1 choices."""
    kwargs = {"messages": req.messages, "max_tokens": req.max_tokens, **req.sampling}
    if req.n > 1:
        kwargs["num_return_sequences"] = req.n
    return kwargs


async def choice_events(gw: Gateway, req: ChatRequest, images: list[bytes]) -> AsyncIterator[ChoiceEvent]:
    """The Delta/Finish events of a request's ``n`` choices as (index, event), each choice's in its order:
    one ensemble request for all of them (module docstring). An error is raised here; closing this
    generator cancels the request, every choice."""
    key = affinity_key(images, req.messages)
    async with aclosing(gw.stream(key, images, req.prompt, **triton_kwargs(req))) as stream:
        async for item in stream:
            yield item.index, item


def merged_usage(usages: list[Usage]) -> Usage:
    """The usage of a request's choices: the prompt once (choice 0's, with its cached tokens), every
    choice's completion tokens."""
    return Usage(usages[0].prompt_tokens, sum(u.completion_tokens for u in usages), usages[0].cached_tokens)


# -- the cache-and-count step ---------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLookup:
    """The response cache's part in one request."""

    key: str | None = None
    """The cache key; None: the request is not cacheable (or the cache is off)."""
    answer: dict[str, Any] | None = None
    """The stored answer on a hit: text, reasoning, finish_reason, usage."""

    @property
    def headers(self) -> dict[str, str]:
        if self.key is None:
            return {}
        return {"x-glmv-cache": "hit" if self.answer is not None else "miss"}


async def look_up(gw: Gateway, req: ChatRequest, images: list[bytes]) -> CacheLookup:
    """A deterministic request of one choice without logprobs is looked up and counted as a hit or a miss."""
    if gw.cache is None or not req.is_deterministic or req.wants_logprobs or req.n > 1:
        return CacheLookup()
    key = cache_key(req, images)
    answer = await gw.cache.get(key)
    gw.metrics.cache.labels("hit" if answer is not None else "miss").inc()
    return CacheLookup(key, answer)


async def record(
    gw: Gateway, lookup: CacheLookup, text: str, reasoning: str, finish_reason: str, usage: Usage
) -> dict[str, Any]:
    """A fresh answer: its tokens are counted; it is stored when cacheable and finished by stop or length."""
    gw.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
    gw.metrics.tokens.labels("completion").inc(usage.completion_tokens)
    answer = {"text": text, "reasoning": reasoning, "finish_reason": finish_reason, "usage": usage_of(usage)}
    if lookup.key is not None and finish_reason in ("stop", "length"):
        assert gw.cache is not None
        await gw.cache.set(lookup.key, answer)
    return answer


def usage_of(usage: Usage) -> dict[str, Any]:
    return usage_dict(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)


# -- one JSON answer ------------------------------------------------------------------------------


async def _complete(
    gw: Gateway, request: Request, req: ChatRequest, images: list[bytes], lookup: CacheLookup, started: float
) -> Response:
    if lookup.answer is not None:
        answers, logprobs, usage = [lookup.answer], [[]], lookup.answer["usage"]
    else:
        try:
            results = await unless_disconnected(request, _results(gw, req, images))
        except ClientDisconnected:
            gw.metrics.disconnects.inc()
            return Response(status_code=499)
        except GlmvError as exc:
            raise api_error_from(exc) from None
        answers = [await record(gw, lookup, r.text, r.reasoning, r.finish_reason, r.usage) for r in results]
        logprobs = [list(r.logprobs) for r in results]
        usage = usage_of(merged_usage([r.usage for r in results]))
    gw.metrics.latency.labels(ENDPOINT, "false").observe(time.monotonic() - started)
    out = completion_from(req, answers, logprobs, usage, gw.output_filter, gw.metrics)
    return JSONResponse(out, headers=lookup.headers)


async def _results(gw: Gateway, req: ChatRequest, images: list[bytes]) -> list[Result]:
    """Every choice's whole answer, in index order."""
    if req.n == 1:
        key = affinity_key(images, req.messages)
        return [await gw.analyze(key, images, req.prompt, **triton_kwargs(req))]
    parts: list[tuple[list[str], list[str], list[dict[str, Any]]]] = [([], [], []) for _ in range(req.n)]
    results: list[Result | None] = [None] * req.n
    async with aclosing(choice_events(gw, req, images)) as events:
        async for index, item in events:
            text, reasoning, logprobs = parts[index]
            logprobs += item.logprobs
            if isinstance(item, Delta):
                text.append(item.text)
                reasoning.append(item.reasoning)
            else:
                assert isinstance(item, Finish)
                results[index] = Result(
                    "".join(text),
                    "".join(reasoning),
                    item.finish_reason,
                    item.usage,
                    item.timings,
                    tuple(logprobs),
                )
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def completion_from(
    req: ChatRequest,
    answers: list[dict[str, Any]],
    logprobs: list[list[dict[str, Any]]],
    usage: dict[str, Any],
    output_filter: OutputFilter,
    metrics: GatewayMetrics,
) -> dict[str, Any]:
    """The ``chat.completion`` body of whole answers (fresh or cached), one choice each, with ``usage``."""
    choices = []
    for index, (answer, items) in enumerate(zip(answers, logprobs, strict=True)):
        text = output_filter.apply(strip_box_markers(answer["text"], metrics))
        text, tool_calls = parse_tool_calls(text, req.tools) if req.tools else (text, [])
        reasoning = (
            output_filter.apply(strip_box_markers(answer["reasoning"], metrics))
            if req.include_reasoning
            else ""
        )
        logprobs_of = items if req.wants_logprobs else None
        choices.append(choice_body(index, text, reasoning, answer["finish_reason"], tool_calls, logprobs_of))
    return completion_body(new_completion_id(), req.model, choices, usage)


def strip_box_markers(text: str, metrics: GatewayMetrics) -> str:
    """Remove GLM's answer-box special tokens (GLM-V#79, #133); each removal is counted."""
    for marker in BOX_MARKERS:
        count = text.count(marker)
        if count:
            metrics.box_markers.inc(count)
            text = text.replace(marker, "")
    return text


# -- a streamed answer ----------------------------------------------------------------------------


async def _stream(
    gw: Gateway, request: Request, req: ChatRequest, images: list[bytes], lookup: CacheLookup, started: float
) -> Response:
    """Waits for the first event, so that an error before the first byte is an HTTP error."""
    events: asyncio.Queue[ChoiceEvent] = asyncio.Queue()
    producer = asyncio.ensure_future(_produce(gw, req, images, lookup.answer, events))
    try:
        first = await unless_disconnected(request, events.get())
    except ClientDisconnected:
        producer.cancel()
        gw.metrics.disconnects.inc()
        return Response(status_code=499)
    if isinstance(first[1], Exception):
        producer.cancel()
        raise api_error_from(first[1])
    body = _sse_body(gw, request, req, lookup, events, first, producer, started)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **lookup.headers}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


async def _produce(
    gw: Gateway,
    req: ChatRequest,
    images: list[bytes],
    cached: dict[str, Any] | None,
    events: asyncio.Queue[ChoiceEvent],
) -> None:
    """Puts the answer's events on ``events``: the cached answer replayed, or Triton's streams."""
    if cached is not None:
        await events.put((0, Delta(text=cached["text"], reasoning=cached["reasoning"])))
        usage = Usage(cached["usage"]["prompt_tokens"], cached["usage"]["completion_tokens"])
        await events.put((0, Finish(cached["finish_reason"], usage, Timings(ttft=0.0, total=0.0))))
        return
    try:
        async with aclosing(choice_events(gw, req, images)) as choices:
            async for pair in choices:
                await events.put(pair)
    except Exception as exc:  # handed to the response (before or after its first byte)
        await events.put((0, exc))


async def _sse_body(
    gw: Gateway,
    request: Request,
    req: ChatRequest,
    lookup: CacheLookup,
    events: asyncio.Queue[ChoiceEvent],
    first: ChoiceEvent,
    producer: asyncio.Future[None],
    started: float,
) -> AsyncIterator[str]:
    completion_id, created = new_completion_id(), int(time.time())
    writers = [
        ChunkWriter(req, gw.output_filter, gw.metrics, index=i, completion_id=completion_id, created=created)
        for i in range(req.n)
    ]
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    parts: list[tuple[list[str], list[str]]] = [([], []) for _ in range(req.n)]  # text, reasoning
    usages: dict[int, Usage] = {}  # of the choices finished
    is_started = [False] * req.n
    is_first_delta = True
    is_finished = False  # [DONE] sent; otherwise the client went away mid-stream
    index, item = first
    getter: asyncio.Future[ChoiceEvent] | None = None
    try:
        while True:
            writer = writers[index]
            if isinstance(item, Exception):
                for event in writer.error(item):
                    yield event
                is_finished = True
                return
            if not is_started[index]:
                is_started[index] = True
                yield writer.start()
            text_parts, reasoning_parts = parts[index]
            if isinstance(item, Finish):
                for event in writer.finish(item):
                    yield event
                usages[index] = item.usage
                if lookup.answer is None:
                    text, reasoning = "".join(text_parts), "".join(reasoning_parts)
                    await record(gw, lookup, text, reasoning, item.finish_reason, item.usage)
                if len(usages) == req.n:
                    for event in writer.end(merged_usage([usages[i] for i in range(req.n)])):
                        yield event
                    is_finished = True
                    return
            else:
                if is_first_delta:
                    is_first_delta = False
                    gw.metrics.ttft.observe(time.monotonic() - started)
                text_parts.append(item.text)
                reasoning_parts.append(item.reasoning)
                for event in writer.delta(item):
                    yield event
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                return
            index, item = getter.result()
    finally:
        watcher.cancel()
        if getter is not None and not getter.done():
            getter.cancel()  # the response was closed while it waited for the next event
        if not is_finished:
            gw.metrics.disconnects.inc()
        if not producer.done():
            producer.cancel()  # closes the gRPC stream: the engine aborts the request
        gw.metrics.latency.labels(ENDPOINT, "true").observe(time.monotonic() - started)


class ChunkWriter:
    """The SSE events of one streamed choice: ``start()``, then ``delta(item)`` per Delta, then
    ``finish(item)`` or ``error(exc)``; ``end(usage)`` once every choice of the answer has finished. Each
    returns the events to send, in order. The choices of one answer share ``completion_id`` and ``created``."""

    def __init__(
        self,
        req: ChatRequest,
        output_filter: OutputFilter,
        metrics: GatewayMetrics,
        index: int = 0,
        completion_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.req = req
        self.metrics = metrics
        self.index = index
        self.completion_id = completion_id or new_completion_id()
        self.created = int(time.time()) if created is None else created
        self._text_filter = output_filter.stream()
        self._reasoning_filter = output_filter.stream()
        self._tool_stream = ToolCallStream(req.tools) if req.tools else None

    def start(self) -> str:
        return self._chunk({"role": "assistant", "content": ""})

    def delta(self, item: Delta) -> list[str]:
        reasoning = (
            self._reasoning_filter.feed(strip_box_markers(item.reasoning, self.metrics))
            if self.req.include_reasoning
            else ""
        )
        text = self._text_filter.feed(strip_box_markers(item.text, self.metrics))
        calls: list[dict[str, Any]] = []
        if self._tool_stream is not None:
            text, calls = self._tool_stream.feed(text)
        logprobs = list(item.logprobs) if self.req.wants_logprobs else None
        events: list[str] = []
        if logprobs and not text and not calls:
            events.append(self._chunk({"content": ""}, logprobs=logprobs))
        if reasoning:
            events.append(self._chunk({"reasoning_content": reasoning}))
        if text:
            events.append(self._chunk({"content": text}, logprobs=logprobs))
        events += [self._chunk({"tool_calls": [call]}) for call in calls]
        return events

    def finish(self, item: Finish) -> list[str]:
        """The text held back, then the finish chunk (with the logprobs of tokens no delta carried)."""
        tail_reasoning, tail_text = self._reasoning_filter.flush(), self._text_filter.flush()
        events: list[str] = []
        finish_reason = item.finish_reason
        if self._tool_stream is not None:
            tail_text, calls = self._tool_stream.feed(tail_text)
            tail_text += self._tool_stream.flush()
            events += [self._chunk({"tool_calls": [call]}) for call in calls]
            if self._tool_stream.num_calls:
                finish_reason = "tool_calls"
        if tail_reasoning:
            events.append(self._chunk({"reasoning_content": tail_reasoning}))
        if tail_text:
            events.append(self._chunk({"content": tail_text}))
        logprobs = list(item.logprobs) if self.req.wants_logprobs and item.logprobs else None
        events.append(self._chunk({}, finish_reason=finish_reason, logprobs=logprobs))
        return events

    def end(self, usage: Usage) -> list[str]:
        """After every choice's finish: the usage chunk (``include_usage``) and ``[DONE]``."""
        events = [self._chunk(None, usage=usage_of(usage))] if self.req.include_usage else []
        events.append(sse_event("[DONE]"))
        return events

    def error(self, exc: Exception) -> list[str]:
        """An error after the first byte: its OpenAI error body as an event, then ``[DONE]``."""
        return [sse_event(api_error_from(exc).body()), sse_event("[DONE]")]

    def _chunk(self, delta: dict[str, Any] | None, **fields: Any) -> str:
        return sse_event(
            chunk_body(self.completion_id, self.req.model, self.created, delta, index=self.index, **fields)
        )
