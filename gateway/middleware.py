"""ASGI middleware counting every response by route and status (``glmv_gateway_requests_total``)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import GatewayMetrics


class RequestMetricsMiddleware:
    """Counts every HTTP response by route and status code."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            endpoint = (
                path if path in _KNOWN_PATHS else ("/static" if path.startswith("/static/") else "other")
            )
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


_KNOWN_PATHS = (
    "/v1/chat/completions",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/infer",
    "/health",
)
