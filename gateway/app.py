"""The gateway's FastAPI application: OpenAI-compatible chat API in front of the Triton ensemble.

Routes: ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /healthz``
(process alive), ``GET /readyz`` (Triton ready *and* a cached 1-token probe answered),
``GET /metrics`` (Prometheus), ``GET /`` (the web page); the GLM-4.6V-Flash-WEB image's ``POST /infer``,
``GET /health`` and its chat body shape (gateway/compat.py).

Only wiring lives here: routes, middleware, error handlers and the shared state (gateway/state.py). A chat
request is answered by gateway/pipeline.py (auth, rate limit, body cap, validation, prompt guard, images,
response cache, Triton; JSON or SSE). Every error body has OpenAI's shape
{"error": {message, type, param, code}}.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from glmv_client import AsyncClient
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .compat import router as compat_router
from .config import GatewayConfig
from .errors import api_error_from
from .middleware import RequestMetricsMiddleware
from .openai_schema import ApiError
from .pipeline import answer_chat
from .state import Gateway

STATIC_DIR = Path(__file__).parent / "static"


def create_app(config: GatewayConfig, client: AsyncClient | None = None) -> FastAPI:
    """The app for ``config``; ``client``: a glmv_client to use instead of one made at start-up."""
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
        return await answer_chat(gw, request)

    # The seed API's routes answer through the same pipeline (gateway/compat.py).
    app.state.answer_chat = functools.partial(answer_chat, gw)

    static_dir = Path(config.static_dir) if config.static_dir else STATIC_DIR

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(static_dir / "index.html", headers={"Cache-Control": "no-cache"})

    app.include_router(compat_router)
    app.mount("/static", StaticFiles(directory=static_dir), name="static")
    return app
