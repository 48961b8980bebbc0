"""Exact-match response cache for deterministic requests (temperature 0 or a seed given).

The key is a SHA-256 over the model, the messages (images by the SHA-256 of their bytes), and
every sampling field; the value is the finished answer (text, reasoning, finish_reason, usage).
In-memory LRU with a TTL by default; Redis when ``redis_url`` is set (the ``redis`` package must
be installed). Only answers that finished normally (``stop`` / ``length``) are stored.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from .openai_schema import ChatRequest


def cache_key(req: ChatRequest, images: list[bytes]) -> str:
    material = {
        "model": req.model,
        "messages": req.messages,
        "images": [hashlib.sha256(b).hexdigest() for b in images],
        "max_tokens": req.max_tokens,
        "sampling": req.sampling,
    }
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "glmv:chat:" + hashlib.sha256(blob.encode()).hexdigest()


class ResponseCache(Protocol):
    async def get(self, key: str) -> dict[str, Any] | None: ...

    async def set(self, key: str, value: dict[str, Any]) -> None: ...

    async def close(self) -> None: ...


class LruCache:
    """In-process LRU with a TTL; ``max_entries`` 0 disables it."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self, key: str) -> dict[str, Any] | None:
        item = self._items.get(key)
        if item is None:
            return None
        stored_at, value = item
        if self.ttl_s and self._clock() - stored_at > self.ttl_s:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    async def set(self, key: str, value: dict[str, Any]) -> None:
        if self.max_entries <= 0:
            return
        self._items[key] = (self._clock(), value)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    async def close(self) -> None:
        self._items.clear()


class RedisCache:
    """Values as JSON strings with a TTL, in Redis."""

    def __init__(self, url: str, ttl_s: float) -> None:
        import redis.asyncio as aioredis  # optional dependency

        self._redis = aioredis.from_url(url)
        self.ttl_s = ttl_s

    async def get(self, key: str) -> dict[str, Any] | None:
        raw = await self._redis.get(key)
        return None if raw is None else json.loads(raw)

    async def set(self, key: str, value: dict[str, Any]) -> None:
        ttl = int(self.ttl_s) if self.ttl_s else None
        await self._redis.set(key, json.dumps(value, ensure_ascii=False), ex=ttl)

    async def close(self) -> None:
        await self._redis.aclose()


def make_cache(size: int, ttl_s: float, redis_url: str) -> ResponseCache | None:
    if redis_url:
        try:
            return RedisCache(redis_url, ttl_s)
        except ImportError as exc:
            from .config import ConfigError

            raise ConfigError(f"redis_url is set but the redis package is not installed ({exc})") from None
    if size <= 0:
        return None
    return LruCache(size, ttl_s)
