"""The gateway's FastAPI application: OpenAI-compatible chat API in front of the Triton ensemble.

Routes: ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /healthz``
(process alive), ``GET /readyz`` (Triton ready *and* a cached 1-token probe answered),
``GET /metrics`` (Prometheus), ``GET /`` (the web page); the GLM-4.6V-Flash-WEB image's ``POST /infer``,
``GET /health`` and its chat body shape (gateway/compat.py).

A chat request goes: auth (401) → rate limit (429 + Retry-After) → body cap (413) → parse and
validate (400/404) → prompt guard (400 ``prompt_rejected``) → images (413/400) → cache
(``x-glmv-cache: hit|miss`` for deterministic requests) → Triton over gRPC streaming through
``glmv_client.AsyncClient``. A client that disconnects cancels its gRPC stream, which cancels the
request in the engine. Every error body has OpenAI's shape {"error": {message, type, param, code}}.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from glmv_client import AsyncClient, Delta, Finish
from glmv_client.errors import GlmvError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .cache import cache_key
from .compat import is_seed_chat, parse_seed_chat
from .compat import router as compat_router
from .config import GatewayConfig
from .disconnect import ClientDisconnected, unless_disconnected, wait_for_disconnect
from .errors import api_error_from, read_body
from .images import resolve_images
from .json_body import parse_json_body
from .json_body import sse_event as sse
from .metrics import GatewayMetrics
from .middleware import RequestMetricsMiddleware
from .openai_schema import (
    ApiError,
    ChatRequest,
    chunk_body,
    completion_body,
    new_completion_id,
    parse_chat_request,
    usage_dict,
)
from .ratelimit import RateLimiter
from .state import Gateway
from .structured import ToolCallStream, parse_tool_calls

STATIC_DIR = Path(__file__).parent / "static"


BOX_MARKERS = ("<|begin_of_box|>", "<|end_of_box|>")


def strip_box_markers(text: str, metrics: GatewayMetrics) -> str:
    """Remove GLM's answer-box special tokens (GLM-V#79, #133); each removal is counted."""
    for marker in BOX_MARKERS:
        count = text.count(marker)
        if count:
            metrics.box_markers.inc(count)
            text = text.replace(marker, "")
    return text


def create_app(config: GatewayConfig, client: AsyncClient | None = None) -> FastAPI:
    gw = Gateway(config, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gw.start()
        try:
            yield
        finally:
            await gw.stop()

    app = FastAPI(
        title="glmv-serve gateway", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    app.state.gateway = gw
    app.add_middleware(RequestMetricsMiddleware, metrics=gw.metrics)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        # Every answer keeps OpenAI's error shape, even for a fault of the gateway itself.
        return JSONResponse(api_error_from(exc).body(), status_code=500)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ok, reason = await gw.readiness()
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "reason": reason}, status_code=200 if ok else 503
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(gw.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict[str, Any]:
        return {
            "id": config.served_model_name,
            "object": "model",
            "created": gw.started_at,
            "owned_by": "glmv-serve",
        }

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        gw.auth.check(request.headers.get("authorization"))
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        gw.auth.check(request.headers.get("authorization"))
        if model_id != config.served_model_name:
            raise ApiError(
                404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
            )
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await answer_counted(request)

    async def answer_counted(request: Request, parsed: ChatRequest | None = None) -> Response:
        gw.metrics.in_flight.inc()
        try:
            response = await answer_chat(request, parsed)
        except BaseException:
            gw.metrics.in_flight.dec()
            raise
        if isinstance(response, StreamingResponse):
            response.background = BackgroundTask(gw.metrics.in_flight.dec)  # runs after the last byte
        else:
            gw.metrics.in_flight.dec()
        return response

    app.state.answer_chat = answer_counted  # the seed API's routes answer through it (gateway/compat.py)

    async def answer_chat(request: Request, parsed: ChatRequest | None = None) -> Response:
        started = time.monotonic()
        key = gw.auth.check(request.headers.get("authorization"))
        bucket = key if key is not None else (request.client.host if request.client else "anonymous")
        wait_s = gw.limiter.acquire(bucket)
        if wait_s > 0:
            retry_after = RateLimiter.retry_after(wait_s)
            raise ApiError(
                429,
                f"Rate limit reached: {config.rate_limit_rps:g} requests per second with bursts of "
                f"{config.rate_limit_burst} (rate_limit_rps, rate_limit_burst). Retry after {retry_after} s.",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry_after)},
            )
        if parsed is None:
            body = parse_json_body(await read_body(request, config.max_body_bytes))
            parsed = parse_seed_chat(body, config) if is_seed_chat(body) else parse_chat_request(body, config)
        req = parsed
        gw.guard.check(req.messages)
        assert gw.http is not None and gw.client is not None
        images = await resolve_images(req.images, config, gw.http)

        is_cacheable = gw.cache is not None and req.is_deterministic and not req.wants_logprobs
        key_hash = cache_key(req, images) if is_cacheable else None
        headers: dict[str, str] = {}
        cached = None
        if key_hash is not None:
            assert gw.cache is not None
            cached = await gw.cache.get(key_hash)
            headers["x-glmv-cache"] = "hit" if cached is not None else "miss"
            gw.metrics.cache.labels("hit" if cached is not None else "miss").inc()

        if req.stream:
            return await stream_answer(request, req, images, key_hash, cached, headers, started)

        if cached is None:
            try:
                result = await unless_disconnected(
                    request,
                    gw.client.analyze(
                        images, req.prompt, messages=req.messages, max_tokens=req.max_tokens, **req.sampling
                    ),
                )
            except ClientDisconnected:
                gw.metrics.disconnects.inc()
                return Response(status_code=499)
            except GlmvError as exc:
                raise api_error_from(exc) from None
            cached = {
                "text": result.text,
                "reasoning": result.reasoning,
                "finish_reason": result.finish_reason,
                "usage": usage_dict(
                    result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.cached_tokens
                ),
                "logprobs": list(result.logprobs),
            }
            gw.metrics.tokens.labels("prompt").inc(result.usage.prompt_tokens)
            gw.metrics.tokens.labels("completion").inc(result.usage.completion_tokens)
            if key_hash is not None and result.finish_reason in ("stop", "length"):
                assert gw.cache is not None
                await gw.cache.set(key_hash, cached)
        gw.metrics.latency.labels("/v1/chat/completions", "false").observe(time.monotonic() - started)
        text = gw.output_filter.apply(strip_box_markers(cached["text"], gw.metrics))
        text, tool_calls = parse_tool_calls(text, req.tools) if req.tools else (text, [])
        out = completion_body(
            new_completion_id(),
            req.model,
            text,
            gw.output_filter.apply(strip_box_markers(cached["reasoning"], gw.metrics))
            if req.include_reasoning
            else "",
            cached["finish_reason"],
            cached["usage"],
            tool_calls=tool_calls,
            logprobs=cached.get("logprobs", []) if req.wants_logprobs else None,
        )
        return JSONResponse(out, headers=headers)

    async def stream_answer(
        request: Request,
        req: ChatRequest,
        images: list[bytes],
        key_hash: str | None,
        cached: dict[str, Any] | None,
        headers: dict[str, str],
        started: float,
    ) -> Response:
        assert gw.client is not None
        events: asyncio.Queue[Delta | Finish | BaseException] = asyncio.Queue()

        async def produce() -> None:
            if cached is not None:
                await events.put(Delta(text=cached["text"], reasoning=cached["reasoning"]))
                usage = cached["usage"]
                await events.put(_cached_finish(cached["finish_reason"], usage))
                return
            stream = None
            try:
                stream = gw.client.stream(
                    images, req.prompt, messages=req.messages, max_tokens=req.max_tokens, **req.sampling
                )
                async for item in stream:
                    await events.put(item)
            except Exception as exc:  # handed to the response (before or after its first byte)
                await events.put(exc)
            finally:
                if stream is not None:
                    await stream.aclose()

        producer = asyncio.ensure_future(produce())
        try:
            first = await unless_disconnected(request, events.get())
        except ClientDisconnected:
            producer.cancel()
            gw.metrics.disconnects.inc()
            return Response(status_code=499)
        if isinstance(first, BaseException):
            producer.cancel()
            raise api_error_from(first) if isinstance(first, Exception) else first

        async def body() -> AsyncIterator[str]:
            completion_id = new_completion_id()
            created = int(time.time())
            text_filter = gw.output_filter.stream()
            reasoning_filter = gw.output_filter.stream()
            watcher = asyncio.ensure_future(wait_for_disconnect(request))
            text_parts: list[str] = []
            reasoning_parts: list[str] = []
            is_first_token = True
            is_finished = False  # [DONE] sent; otherwise the client went away mid-stream
            tool_stream = ToolCallStream(req.tools) if req.tools else None
            item: Delta | Finish | BaseException = first
            getter: asyncio.Future | None = None
            try:
                yield sse(chunk_body(completion_id, req.model, created, {"role": "assistant", "content": ""}))
                while True:
                    if isinstance(item, BaseException):
                        err = (
                            api_error_from(item)
                            if isinstance(item, Exception)
                            else api_error_from(RuntimeError())
                        )
                        yield sse(err.body())
                        yield sse("[DONE]")
                        is_finished = True
                        return
                    if isinstance(item, Delta):
                        if is_first_token:
                            gw.metrics.ttft.observe(time.monotonic() - started)
                            is_first_token = False
                        text_parts.append(item.text)
                        reasoning_parts.append(item.reasoning)
                        reasoning = (
                            reasoning_filter.feed(strip_box_markers(item.reasoning, gw.metrics))
                            if req.include_reasoning
                            else ""
                        )
                        text = text_filter.feed(strip_box_markers(item.text, gw.metrics))
                        calls: list[dict[str, Any]] = []
                        if tool_stream is not None:
                            text, calls = tool_stream.feed(text)
                        logprobs = list(item.logprobs) if req.wants_logprobs else None
                        if logprobs and not text and not calls:
                            text_delta = {"content": ""}
                            yield sse(
                                chunk_body(completion_id, req.model, created, text_delta, logprobs=logprobs)
                            )
                        if reasoning:
                            yield sse(
                                chunk_body(
                                    completion_id, req.model, created, {"reasoning_content": reasoning}
                                )
                            )
                        if text:
                            yield sse(
                                chunk_body(
                                    completion_id, req.model, created, {"content": text}, logprobs=logprobs
                                )
                            )
                        for call in calls:
                            yield sse(chunk_body(completion_id, req.model, created, {"tool_calls": [call]}))
                    else:
                        tail_r, tail_t = reasoning_filter.flush(), text_filter.flush()
                        if tool_stream is not None:
                            tail_t, calls = tool_stream.feed(tail_t)
                            tail_t += tool_stream.flush()
                            for call in calls:
                                yield sse(
                                    chunk_body(completion_id, req.model, created, {"tool_calls": [call]})
                                )
                        if tail_r:
                            yield sse(
                                chunk_body(completion_id, req.model, created, {"reasoning_content": tail_r})
                            )
                        if tail_t:
                            yield sse(chunk_body(completion_id, req.model, created, {"content": tail_t}))
                        usage = usage_dict(
                            item.usage.prompt_tokens, item.usage.completion_tokens, item.usage.cached_tokens
                        )
                        finish_reason = item.finish_reason
                        if tool_stream is not None and tool_stream.num_calls:
                            finish_reason = "tool_calls"
                        yield sse(
                            chunk_body(completion_id, req.model, created, {}, finish_reason=finish_reason)
                        )
                        if req.include_usage:
                            yield sse(chunk_body(completion_id, req.model, created, None, usage=usage))
                        yield sse("[DONE]")
                        is_finished = True
                        if cached is None:
                            gw.metrics.tokens.labels("prompt").inc(item.usage.prompt_tokens)
                            gw.metrics.tokens.labels("completion").inc(item.usage.completion_tokens)
                            if key_hash is not None and item.finish_reason in ("stop", "length"):
                                assert gw.cache is not None
                                await gw.cache.set(
                                    key_hash,
                                    {
                                        "text": "".join(text_parts),
                                        "reasoning": "".join(reasoning_parts),
                                        "finish_reason": item.finish_reason,
                                        "usage": usage,
                                    },
                                )
                        return
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                    if not getter.done():
                        getter.cancel()
                        return
                    item = getter.result()
            finally:
                watcher.cancel()
                if getter is not None and not getter.done():
                    getter.cancel()  # the response was closed while it waited for the next event
                if not is_finished:
                    gw.metrics.disconnects.inc()
                if not producer.done():
                    producer.cancel()  # closes the gRPC stream: the engine aborts the request
                gw.metrics.latency.labels("/v1/chat/completions", "true").observe(time.monotonic() - started)

        stream_headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers}
        return StreamingResponse(body(), media_type="text/event-stream", headers=stream_headers)

    static_dir = Path(config.static_dir) if config.static_dir else STATIC_DIR

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(compat_router)
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app


def _cached_finish(finish_reason: str, usage: dict[str, int]) -> Finish:
    from glmv_client.results import Timings, Usage

    return Finish(
        finish_reason=finish_reason,
        usage=Usage(usage["prompt_tokens"], usage["completion_tokens"]),
        timings=Timings(ttft=0.0, total=0.0),
    )
