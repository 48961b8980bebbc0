"""The Triton servers behind the gateway, and which one answers a request.

With one server per GPU (docs/DEPLOY.md), each server has its own prefix and image caches: a follow-up
question finds the first question's KV blocks only on the server that answered it. So requests carry an
affinity key, and each key has a preferred order of servers (rendezvous hashing: the servers sorted by
``sha256(key + url)``), the same in every gateway process and unchanged for other keys when a server is
added or removed. The key is the first image's bytes; a request without images uses its opening
messages (the system prompt and first user turn, which a resent conversation repeats).

Contract:
- ``Backends(urls, make_client, load_factor, retry_after_s)``; ``order(key)`` -> the servers to try, in
  order: the key's preferred order with servers marked down moved last, and servers at their load bound
  (``ceil(load_factor * (in_flight + 1) / servers up)``, consistent hashing with bounded loads) moved
  after those under it, so one hot image cannot pile onto one GPU while another idles.
- ``lease(backend)`` counts a request in flight on it (a context manager).
- ``mark_down(backend)``: a server that could not be reached is tried last for ``retry_after_s``; a
  readiness probe that passes marks it up again.
- One server: no hashing, ``order`` is always that server.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from glmv_client import AsyncClient


@dataclass(eq=False)
class Backend:
    url: str
    client: AsyncClient
    in_flight: int = 0
    down_until: float = 0.0  # monotonic time before which the server is tried last
    seed: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.seed = self.url.encode()

    @property
    def is_up(self) -> bool:
        return time.monotonic() >= self.down_until


def affinity_key(images: list[bytes], messages: list[dict[str, Any]]) -> bytes:
    """The first image's bytes, else the opening messages (system prompt and first user turn)."""
    if images:
        return hashlib.sha256(images[0]).digest()
    opening: list[dict[str, Any]] = []
    for message in messages:
        opening.append(message)
        if message.get("role") == "user":
            break
    return hashlib.sha256(json.dumps(opening, sort_keys=True, ensure_ascii=False).encode()).digest()


class Backends:
    def __init__(
        self,
        urls: list[str],
        make_client: Callable[[str], AsyncClient],
        *,
        load_factor: float = 1.25,
        retry_after_s: float = 5.0,
    ) -> None:
        if not urls:
            raise ValueError("triton_url: at least one Triton address")
        self.backends = [Backend(url, make_client(url)) for url in urls]
        self.load_factor = load_factor
        self.retry_after_s = retry_after_s

    def __len__(self) -> int:
        return len(self.backends)

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.backends)

    def order(self, key: bytes) -> list[Backend]:
        """The servers to try for ``key``, best first (see the module docstring)."""
        if len(self.backends) == 1:
            return list(self.backends)
        preferred = sorted(self.backends, key=lambda b: hashlib.sha256(key + b.seed).digest(), reverse=True)
        up = [b for b in preferred if b.is_up]
        down = [b for b in preferred if not b.is_up]
        if not up:
            return down
        bound = math.ceil(self.load_factor * (sum(b.in_flight for b in up) + 1) / len(up))
        under = [b for b in up if b.in_flight < bound]
        return under + [b for b in up if b.in_flight >= bound] + down

    @contextmanager
    def lease(self, backend: Backend) -> Iterator[Backend]:
        backend.in_flight += 1
        try:
            yield backend
        finally:
            backend.in_flight -= 1

    def mark_down(self, backend: Backend) -> None:
        backend.down_until = time.monotonic() + self.retry_after_s

    def mark_up(self, backend: Backend) -> None:
        backend.down_until = 0.0

    async def close(self) -> None:
        for backend in self.backends:
            await backend.client.close()
