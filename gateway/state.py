"""Shared state of one gateway app: config, Triton servers, auth, limiter, cache, guard, metrics, readiness.

``Gateway.analyze`` / ``Gateway.stream`` send a request to the Triton server its affinity key prefers
(gateway/backends.py); a server that cannot be reached before anything was answered is marked down and
the next one is tried. ``Gateway.readiness()`` answers (ready, reason): a server and its model report
ready *and* a 1-token greedy probe completes, on at least one server (the reason names those that fail);
the answer is reused for ``readiness_ttl_s`` so probes stay cheap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
from glmv_client import AsyncClient, Delta, Finish, Limits, Result
from glmv_client.errors import GlmvError, ServerUnavailableError

from .auth import ApiKeyAuth
from .backends import Backend, Backends
from .cache import ResponseCache, make_cache
from .config import GatewayConfig
from .guard import OutputFilter, PromptGuard
from .metrics import GatewayMetrics
from .ratelimit import RateLimiter


class Gateway:
    """Shared state of one app: config, backend client, limiters, cache, metrics."""

    def __init__(self, config: GatewayConfig, client: AsyncClient | None = None) -> None:
        """``client``: a glmv_client to use as the one Triton server instead of those of ``triton_url``."""
        self.config = config
        self._client = client
        self.backends: Backends | None = None
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
        limits = Limits(
            max_image_bytes=self.config.max_image_bytes,
            max_images_per_request=self.config.max_images_per_request,
            max_tokens=self.config.max_tokens_limit,
            max_num_return_sequences=self.config.max_choices,
        )
        urls = self.config.triton_urls

        def make_client(url: str) -> AsyncClient:
            if self._client is not None:
                return self._client
            return AsyncClient(
                url,
                protocol="grpc",
                timeout=self.config.request_timeout_s,
                model=self.config.triton_model,
                limits=limits,
                # several servers: an unreachable one is left for the next at once (the gateway fails over)
                max_retries=2 if len(urls) == 1 else 0,
            )

        self.backends = Backends(
            [self._client.url] if self._client is not None else list(urls),
            make_client,
            load_factor=self.config.backend_load_factor,
            retry_after_s=self.config.backend_retry_s,
        )
        self.http = httpx.AsyncClient(timeout=self.config.image_url_timeout_s)

    async def stop(self) -> None:
        if self.backends is not None:
            await self.backends.close()
        if self.http is not None:
            await self.http.aclose()
        if self.cache is not None:
            await self.cache.close()

    # -- requests, on the server the affinity key prefers --------------------------------------------

    def _order(self, key: bytes) -> list[Backend]:
        assert self.backends is not None, "Gateway.start() first"
        return self.backends.order(key)

    @contextmanager
    def _lease(self, backend: Backend) -> Iterator[None]:
        """Counts a request in flight on ``backend`` (for its load bound and its gauge)."""
        assert self.backends is not None
        with (
            self.backends.lease(backend),
            self.metrics.backend_in_flight.labels(backend.url).track_inprogress(),
        ):
            yield

    def _failed_over(self, backend: Backend) -> None:
        assert self.backends is not None
        self.backends.mark_down(backend)
        self.metrics.failovers.labels(backend.url).inc()

    async def analyze(self, key: bytes, images: list[bytes], prompt: str, **kwargs: Any) -> Result:
        """A whole answer from the first server of ``key``'s order that can be reached."""
        unreachable: ServerUnavailableError | None = None
        for backend in self._order(key):
            with self._lease(backend):
                try:
                    result = await backend.client.analyze(images, prompt, **kwargs)
                except ServerUnavailableError as exc:
                    self._failed_over(backend)
                    unreachable = exc
                    continue
            self.metrics.backend_requests.labels(backend.url).inc()
            return result
        assert unreachable is not None
        raise unreachable

    async def stream(
        self, key: bytes, images: list[bytes], prompt: str, **kwargs: Any
    ) -> AsyncIterator[Delta | Finish]:
        """A streamed answer from the first server of ``key``'s order that can be reached; once a server
        has answered, its errors are the stream's."""
        unreachable: ServerUnavailableError | None = None
        for backend in self._order(key):
            with self._lease(backend):
                stream = backend.client.stream(images, prompt, **kwargs)
                answered = False
                try:
                    async for item in stream:
                        if not answered:
                            answered = True
                            self.metrics.backend_requests.labels(backend.url).inc()
                        yield item
                    return
                except ServerUnavailableError as exc:
                    if answered:
                        raise
                    self._failed_over(backend)
                    unreachable = exc
                finally:
                    await stream.aclose()
        assert unreachable is not None
        raise unreachable

    # -- readiness -----------------------------------------------------------------------------------

    async def readiness(self) -> tuple[bool, str]:
        """(ready, reason): at least one server ready and answering a 1-token probe; reused for
        readiness_ttl_s. A server that fails its probe is tried last until one passes."""
        async with self._ready_lock:
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < self.config.readiness_ttl_s:
                return self._ready[1], self._ready[2]
            assert self.backends is not None
            backends = list(self.backends)
            results = await asyncio.gather(*(self._probe(b) for b in backends))
            for backend, (ok, _) in zip(backends, results, strict=True):
                (self.backends.mark_up if ok else self.backends.mark_down)(backend)
            failing = [
                f"{b.url}: {reason}" for b, (ok, reason) in zip(backends, results, strict=True) if not ok
            ]
            ok = len(failing) < len(backends)
            if not failing:
                reason = "ready"
            elif len(backends) == 1:
                reason = results[0][1]
            elif ok:
                reason = (
                    f"ready on {len(backends) - len(failing)} of {len(backends)} Triton servers; "
                    + "; ".join(failing)
                )
            else:
                reason = "no Triton server is ready: " + "; ".join(failing)
            self._ready = (time.monotonic(), ok, reason)
            return ok, reason

    async def _probe(self, backend: Backend) -> tuple[bool, str]:
        if not await backend.client.is_ready():
            return False, f"Triton at {backend.url} or model '{self.config.triton_model}' is not ready"
        try:
            await asyncio.wait_for(
                backend.client.analyze(None, "ping", max_tokens=1, temperature=0.0),
                self.config.readiness_timeout_s,
            )
        except (GlmvError, asyncio.TimeoutError) as exc:
            return False, f"the engine did not answer a 1-token probe: {type(exc).__name__}: {exc}"
        return True, "ready"
