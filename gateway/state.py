"""Shared state of one gateway app: config, backend client, auth, limiter, cache, guard, metrics, readiness.

``Gateway.readiness()`` answers (ready, reason): Triton and the model report ready *and* a 1-token greedy
probe completes; the answer is reused for ``readiness_ttl_s`` so probes stay cheap.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from glmv_client import AsyncClient, Limits
from glmv_client.errors import GlmvError

from .auth import ApiKeyAuth
from .cache import ResponseCache, make_cache
from .config import GatewayConfig
from .guard import OutputFilter, PromptGuard
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter


class Gateway:
    """Shared state of one app: config, backend client, limiters, cache, metrics."""

    def __init__(self, config: GatewayConfig, client: AsyncClient | None = None) -> None:
        self.config = config
        self.client = client
        self.auth = ApiKeyAuth(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit_rps, config.rate_limit_burst)
        self.cache: ResponseCache | None = make_cache(config.cache_size, config.cache_ttl_s, config.redis_url)
        self.guard = PromptGuard(config.prompt_guard_phrases)
        self.output_filter = OutputFilter(config.output_filter_words)
        self.metrics = GatewayMetrics()
        self.http: httpx.AsyncClient | None = None
        self.started_at = int(time.time())
        self._ready: tuple[float, bool, str] | None = None
        self._ready_lock = asyncio.Lock()

    async def start(self) -> None:
        if self.client is None:
            limits = Limits(
                max_image_bytes=self.config.max_image_bytes,
                max_images_per_request=self.config.max_images_per_request,
                max_tokens=self.config.max_tokens_limit,
            )
            self.client = AsyncClient(
                self.config.triton_url,
                protocol="grpc",
                timeout=self.config.request_timeout_s,
                model=self.config.triton_model,
                limits=limits,
            )
        self.http = httpx.AsyncClient(timeout=self.config.image_url_timeout_s)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.http is not None:
            await self.http.aclose()
        if self.cache is not None:
            await self.cache.close()

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): Triton ready and a 1-token greedy probe answered; reused for readiness_ttl_s."""
        async with self._ready_lock:
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < self.config.readiness_ttl_s:
                return self._ready[1], self._ready[2]
            assert self.client is not None
            ok, reason = False, ""
            if not await self.client.is_ready():
                reason = (
                    f"Triton at {self.config.triton_url} or model '{self.config.triton_model}' is not ready"
                )
            else:
                try:
                    await asyncio.wait_for(
                        self.client.analyze(None, "ping", max_tokens=1, temperature=0.0),
                        self.config.readiness_timeout_s,
                    )
                    ok, reason = True, "ready"
                except (GlmvError, asyncio.TimeoutError) as exc:
                    reason = f"the engine did not answer a 1-token probe: {type(exc).__name__}: {exc}"
            self._ready = (time.monotonic(), ok, reason)
            return ok, reason
